"""Run many multi-turn tool-use episodes at once, in token space.

Per episode: render the prompt with the chat template, sample a turn, decode it only to let the
env parse and run the tool calls, append the env's observation rendered by the chat template,
sample the next turn, ... until the env says done, `max_turns`, or a token limit. The trained
sequence keeps the sampled ids verbatim. Each episode's next turn is submitted to the engine as
soon as its env step returns (env steps of different episodes run in a thread pool), so a slow
tool holds up only its own episode.
"""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from fastrl.data.chat_template import (end_of_turn_id, render_observation, render_prompt,
                                       render_turn_tail)
from fastrl.data.trajectory import Trajectory
from fastrl.rollout.engine import Completion, Engine, GenerationRequest
from fastrl.rollout.sampling import SamplingConfig

TOOL_CALL_CLOSE = "</tool_call>"


@dataclass
class RolloutTrajectory(Trajectory):
    """A sampled episode plus how it went.

    `sampled_with_hint`: the assistant tokens were sampled under `hinted_prompt_ids`, not under
    the hint-free prompt the trajectory trains on, so their rollout log-probs are those of the
    hinted context (an importance correction needs the trainer's log-probs under both).
    `stop_reason`: "answer" (the env finished on a final answer), "env_done" (the env ended it
    otherwise), "max_turns", "max_new_tokens" (a turn hit the per-turn limit: truncated, not
    closed), "max_total_tokens" (the episode limit: the last turn truncated, or the next
    observation did not fit and was left out).
    """
    sampled_with_hint: bool = False
    stop_reason: str = ""
    truncated: bool = False               # the last assistant turn never closed
    reward_info: dict = field(default_factory=dict)   # env.reward(state)
    turn_infos: list[dict] = field(default_factory=list)  # env.step infos, one per turn
    messages: list[dict] = field(default_factory=list)    # the conversation as the env kept it
    rollout_index: int = 0                # index within the group

    @property
    def num_turns(self) -> int:
        return len(self.turn_infos)


@dataclass
class _Episode:
    index: int
    task_index: int
    traj: RolloutTrajectory
    state: object
    context: list[int]                    # token ids the engine sees (hinted prompt if hinted)
    turn: int = 0


class _Driver:
    def __init__(self, engine: Engine, env, sampling: SamplingConfig):
        self.engine, self.env, self.s = engine, env, sampling
        self.tok = engine.tokenizer
        self.eot = end_of_turn_id(self.tok)
        self.stop_ids: tuple[int, ...] = (self.eot,)
        if sampling.stop_at_tool_close:
            close = self.tok.convert_tokens_to_ids(TOOL_CALL_CLOSE)
            if close is None or close == self.tok.unk_token_id:
                raise ValueError(f"stop_at_tool_close: {TOOL_CALL_CLOSE!r} is not a single "
                                 "token of this tokenizer")
            self.stop_ids = (self.eot, int(close))
        self.lock = threading.Lock()  # Rust tokenizers are not safe to share across threads

    # ---- engine side (main thread) ----------------------------------------------------------
    def submit(self, ep: _Episode) -> int:
        """Queue the episode's next turn; returns its token budget."""
        budget = min(self.s.max_new_tokens, self.s.max_total_tokens - len(ep.context))
        seed = None if self.s.seed is None else \
            (self.s.seed * 1_000_003 + ep.index * 1_009 + ep.turn) % (2**31)
        self.engine.add_request(GenerationRequest(
            request_id=f"{ep.index}:{ep.turn}", prompt_ids=list(ep.context),
            max_new_tokens=budget, temperature=self.s.temperature, top_p=self.s.top_p,
            seed=seed, stop_token_ids=self.stop_ids))
        return budget

    # ---- env side (worker threads) -----------------------------------------------------------
    def env_turn(self, ep: _Episode, c: Completion, budget: int) -> bool:
        """Record a sampled turn, step the env, append the observation; True if ep goes on."""
        t = ep.traj
        if t.weight_version is None:
            t.weight_version = c.weight_version
        elif t.weight_version != c.weight_version:
            raise RuntimeError(f"episode {ep.index} (task {t.task_id}): turn {ep.turn} sampled by "
                               f"weight version {c.weight_version}, earlier turns by "
                               f"{t.weight_version}")
        ids = list(c.token_ids)
        if not ids:  # engines always return at least one token; guard the invariant anyway
            raise RuntimeError(f"episode {ep.index} (task {t.task_id}): empty completion")
        t.add_assistant(ids, c.logprobs)
        ep.context += ids
        ep.turn += 1
        closed = c.finish_reason == "stop" and ids[-1] in self.stop_ids
        at_close_tag = closed and ids[-1] != self.eot  # stop_at_tool_close: eot not sampled
        with self.lock:
            text = self.tok.decode(ids, skip_special_tokens=False)
        try:
            obs, done, info = self.env.step(ep.state, text)
        except Exception as e:  # an env bug, not the model's fault: fail naming the episode
            raise RuntimeError(f"env.step failed for task {t.task_id} (rollout {t.rollout_index},"
                               f" turn {ep.turn - 1}): {type(e).__name__}: {e}") from e
        t.turn_infos.append(dict(info))
        tools = ep.state.tools

        if not closed:
            t.truncated = True
            t.stop_reason = "max_new_tokens" if budget >= self.s.max_new_tokens \
                else "max_total_tokens"
            return False
        glue = [self.eot] if at_close_tag else []
        turn_ids = ids + glue
        if done or ep.turn >= self.s.max_turns:
            t.stop_reason = ("answer" if info.get("answer") is not None else "env_done") \
                if done else "max_turns"
            with self.lock:
                tail = render_turn_tail(self.tok, self._through_assistant(ep.state, obs, done),
                                        tools=tools)
            if glue or tail:
                t.add_observation(glue + tail)
            return False
        with self.lock:
            obs_ids = render_observation(self.tok, self._through_assistant(ep.state, obs, done),
                                         obs, tools=tools, assistant_ids=turn_ids)
        obs_ids = glue + obs_ids
        if len(ep.context) + len(obs_ids) >= self.s.max_total_tokens:
            t.stop_reason = "max_total_tokens"  # no room to sample after the observation
            return False
        t.add_observation(obs_ids)
        ep.context += obs_ids
        return True

    @staticmethod
    def _through_assistant(state, obs, done) -> list[dict]:
        """The env's messages up to the assistant turn just stepped (it appends the observation
        to state.messages unless the episode is done)."""
        msgs = state.messages
        return list(msgs) if done or not obs else list(msgs[:len(msgs) - len(obs)])

    def finish(self, ep: _Episode) -> None:
        t = ep.traj
        t.reward_info = dict(self.env.reward(ep.state))
        t.reward = float(t.reward_info.get("total", 0.0))
        t.format_error = t.truncated or any(not i.get("format_ok", True) for i in t.turn_infos)
        t.messages = list(ep.state.messages)


def generate_episodes(engine: Engine, env, tasks: list, sampling: SamplingConfig
                      ) -> list[RolloutTrajectory]:
    """`sampling.n` episodes per task, returned task by task (group_id = task index); the first
    `sampling.num_hinted` of each group are sampled with the task's hint in the system prompt."""
    sampling.validate()
    d = _Driver(engine, env, sampling)
    episodes: list[_Episode] = []
    for ti, task in enumerate(tasks):
        task_id = str(getattr(task, "id", ti))
        clean_state = env.reset(task, hint=False)
        clean = render_prompt(d.tok, clean_state.messages, tools=clean_state.tools)
        hinted = None
        for k in range(sampling.n):
            use_hint = k < sampling.num_hinted
            state = env.reset(task, hint=True) if use_hint else \
                (clean_state if k == 0 else env.reset(task, hint=False))
            if use_hint and hinted is None:
                hinted = render_prompt(d.tok, state.messages, tools=state.tools)
            context = list(hinted if use_hint else clean)
            if len(context) >= sampling.max_total_tokens:
                raise ValueError(f"task {task_id}: prompt has {len(context)} tokens, not below "
                                 f"max_total_tokens={sampling.max_total_tokens}")
            traj = RolloutTrajectory(task_id=task_id, group_id=ti, rollout_index=k,
                                     sampled_with_hint=use_hint,
                                     hinted_prompt_ids=np.asarray(hinted, dtype=np.int64)
                                     if use_hint else None)
            traj.add_prompt(clean)
            episodes.append(_Episode(len(episodes), ti, traj, state, context))

    running: dict[Future, _Episode] = {}
    by_request: dict[str, tuple[_Episode, int]] = {}

    def submit(ep: _Episode) -> None:
        by_request[f"{ep.index}:{ep.turn}"] = (ep, d.submit(ep))

    with ThreadPoolExecutor(max_workers=sampling.env_workers,
                            thread_name_prefix="fastrl-env") as pool:
        try:
            for ep in episodes:
                submit(ep)
            while engine.has_unfinished() or running:
                if engine.batch_per_step and running:  # gather the whole turn into one batch
                    wait(list(running))
                if engine.has_unfinished():
                    for c in engine.step():
                        ep, budget = by_request.pop(c.request_id)
                        running[pool.submit(d.env_turn, ep, c, budget)] = ep
                    ready = [f for f in running if f.done()]
                else:  # nothing to generate: wait for a tool to return
                    ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
                # In episode order: a batching engine then sees the same batches every run.
                for f in sorted(ready, key=lambda f: running[f].index):
                    ep = running.pop(f)
                    if f.result():  # re-raises an env failure
                        submit(ep)
                    else:
                        d.finish(ep)
        except BaseException:
            engine.abort()  # leave no orphaned requests behind (they would block weight sync)
            raise
    return [ep.traj for ep in episodes]
