"""Rollout path without vLLM: the transformers engine against a plain forward pass, the episode
driver on scripted and real engines (tool calls, malformed calls, timeouts, token limits, hints,
no per-turn barrier), expert trajectories and the version check. The references are the real
tokenizer's chat template and the transformers model's own forward pass."""
import os
import random
import time

import numpy as np
import pytest
import torch

from fastrl.data.chat_template import render_prompt
from fastrl.data.trajectory import Role
from fastrl.envs import HERMES, SYNTAXES, SyntheticConfig, SyntheticEnv, make_tasks, tool
from fastrl.rollout import (SamplingConfig, StaleTrajectoryError, check_versions,
                            expert_trajectory, generate_episodes, make_engine)
from fastrl.rollout.engine import GenerationRequest
from fastrl.rollout.testing import ScriptedEngine, build_turn_ending_model

SEED = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_rollout seed={SEED} (rerun with FASTRL_TEST_SEED={SEED})")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_turn_ending_model(str(tmp_path_factory.mktemp("tiny")), seed=SEED % 1000)


@pytest.fixture(scope="module")
def hf(model_path):
    return make_engine("hf", model_path)


def full_logprobs(model, prompt, tokens, temperature=1.0):
    """Log-probs of `tokens` after `prompt` from one unpadded forward pass (the reference)."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def random_prompts(tok, rng, n):
    words = "add lookup red blue the value of key Compute answer tool".split()
    return [tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))),
                       add_special_tokens=False) for _ in range(n)]


# ---- transformers engine ------------------------------------------------------------------

@pytest.mark.parametrize("mode,temperature", [("raw", 1.0), ("processed", 0.7), ("raw", 0.0)])
def test_hf_logprobs_match_unpadded_forward(hf, model_path, mode, temperature):
    engine = make_engine("hf", model_path, logprobs_mode=mode) if mode != "raw" else hf
    rng = random.Random(SEED)
    prompts = random_prompts(engine.tokenizer, rng, 5)  # different lengths: left padding
    reqs = [GenerationRequest(f"r{i}", p, max_new_tokens=rng.randint(3, 12),
                              temperature=temperature, seed=SEED + i)
            for i, p in enumerate(prompts)]
    for r, c in zip(reqs, engine.generate(reqs)):
        assert c.finish_reason == "length" and len(c.token_ids) == r.max_new_tokens
        ref = full_logprobs(engine.model, r.prompt_ids, c.token_ids,
                            temperature if mode == "processed" else 1.0)
        np.testing.assert_allclose(c.logprobs, ref.numpy(), atol=1e-4)


def test_hf_stops_after_stop_token(hf):
    prompt = random_prompts(hf.tokenizer, random.Random(SEED), 1)[0]
    greedy = hf.generate([GenerationRequest("g", prompt, 12, temperature=0.0)])[0].token_ids
    stop = greedy[5]
    c = hf.generate([GenerationRequest("s", prompt, 12, temperature=0.0,
                                       stop_token_ids=(stop,))])[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == greedy[:greedy.index(stop) + 1]


def test_hf_weight_update_changes_and_restores(model_path):
    engine = make_engine("hf", model_path)
    prompt = random_prompts(engine.tokenizer, random.Random(SEED), 1)[0]
    req = lambda: [GenerationRequest("w", prompt, 8, temperature=0.0)]  # noqa: E731
    before = engine.generate(req())[0]
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    g = torch.Generator().manual_seed(SEED)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    engine.update_weights(noisy, version=1)
    after = engine.generate(req())[0]
    assert after.weight_version == 1
    assert not np.allclose(after.logprobs[:1], before.logprobs[:1], atol=1e-3)
    engine.update_weights(original, version=2)
    again = engine.generate(req())[0]
    assert again.token_ids == before.token_ids and again.weight_version == 2
    np.testing.assert_allclose(again.logprobs, before.logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="version"):
        engine.update_weights(original, version=1)
    with pytest.raises(KeyError, match="nope"):
        engine.update_weights({"nope": torch.zeros(1)}, version=3)
    engine.add_request(req()[0])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.update_weights(original, version=3)


# ---- episode driver with a scripted policy ---------------------------------------------------

def gold_texts(task):
    syntax = SYNTAXES[task.syntax]
    out = []
    for m in task.gold_messages:
        if m["role"] == "assistant":
            calls = [(c["function"]["name"], c["function"]["arguments"])
                     for c in m.get("tool_calls") or []]
            out.append(syntax.render_turn(calls, m.get("content") or "") if calls
                       else m["content"])
    return out


class SlowEnv(SyntheticEnv):
    """The synthetic env plus a `slow` tool that outlives the per-call timeout."""

    def registry(self, task):
        reg = super().registry(task)

        @tool
        def slow(x: int) -> int:
            """Sleep, then echo.

            Args:
                x: A number.
            """
            time.sleep(0.6)
            return x
        reg.register(slow)
        return reg


BAD_TURNS = [
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,}\n</tool_call>',   # invalid JSON
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}',          # never closed
    '{"name": "add", "arguments": {"a": 1, "b": 2}}',                       # bare JSON
    HERMES.render_call("nosuchtool", {"a": 1}),                             # unknown tool
    "SLOW",                                         # a call of `slow` in the task's syntax
    "",                                                                     # empty turn
]


def scripted_policy(tasks, sampling, bad_every=2):
    """Rollout k of a group replays the gold turns; odd rollouts first make one bad turn."""
    def policy(request, ep, turn):
        task = tasks[ep // sampling.n]
        k = ep % sampling.n
        script = gold_texts(task)
        if k % bad_every == 1:
            script = [BAD_TURNS[(ep + task.difficulty) % len(BAD_TURNS)]] + script
        text = script[min(turn, len(script) - 1)]
        return SYNTAXES[task.syntax].render_call("slow", {"x": 3}) if text == "SLOW" else text
    return policy


def expected_rendering(tok, env, task, traj):
    """The chat template's rendering of the whole (hint-free) conversation."""
    clean = env.reset(task, hint=False).messages
    msgs = clean + traj.messages[len(clean):]
    return tok.apply_chat_template(msgs, tools=env.tools(task), tokenize=True,
                                   add_generation_prompt=False, return_dict=False)


def test_scripted_episodes_match_template_and_handle_bad_calls(hf):
    tok = hf.tokenizer
    env = SlowEnv(SyntheticConfig(tool_timeout_s=0.2, max_turns=10))
    tasks = make_tasks("train", 4, seed=SEED % 1000) + make_tasks("format_shift", 2,
                                                                 seed=SEED % 1000)
    sampling = SamplingConfig(n=4, num_hinted=2, max_new_tokens=200, max_turns=10,
                              max_total_tokens=4096)
    engine = ScriptedEngine(tok, scripted_policy(tasks, sampling), seed=SEED)
    trajs = generate_episodes(engine, env, tasks, sampling)
    assert len(trajs) == len(tasks) * sampling.n
    saw = set()
    for i, t in enumerate(trajs):
        task = tasks[i // sampling.n]
        k = i % sampling.n
        assert (t.task_id, t.group_id, t.rollout_index) == (task.id, i // sampling.n, k)
        assert t.stop_reason == "answer" and not t.truncated
        assert t.weight_version == 0
        # Token ids are the template's rendering of the whole conversation, prompt hint-free.
        assert t.token_ids.tolist() == expected_rendering(tok, env, task, t)
        assert t.prompt_ids.tolist() == render_prompt(tok, env.reset(task).messages,
                                                      tools=env.tools(task))
        assert t.sampled_with_hint == (k < 2)
        if t.sampled_with_hint:
            hinted = render_prompt(tok, env.reset(task, hint=True).messages, tools=env.tools(task))
            assert t.hinted_prompt_ids.tolist() == hinted
            assert task.hint in t.messages[0]["content"]
        else:
            assert t.hinted_prompt_ids is None
        roles = [s.role for s in t.segments]
        assert roles[0] is Role.PROMPT and roles[-1] is Role.OBSERVATION
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert all(s.token_ids[-1] == tok.eos_token_id for s in t.segments
                   if s.role is Role.ASSISTANT)
        bad = k % 2 == 1
        timeout = bad and (i + task.difficulty) % len(BAD_TURNS) == 4
        assert t.num_turns == len(gold_texts(task)) + bad
        assert t.format_error == (bad and not timeout)
        assert t.reward_info["correct"] == 1.0
        assert t.reward == pytest.approx(t.reward_info["total"])
        assert (t.reward_info["format"] < 1.0) == (bad and not timeout)
        if timeout:
            assert "timed out" in t.turn_infos[0]["tool_errors"][0]
            assert "timed out" in tok.decode(t.segments[2].token_ids)
            saw.add("timeout")
        elif bad:
            assert not t.turn_infos[0]["format_ok"] and t.turn_infos[0]["format_errors"]
            saw.add("format")
    assert "format" in saw


def test_no_per_turn_barrier_behind_a_slow_tool(hf):
    """While one episode waits on a slow tool, the others run to completion."""
    tok = hf.tokenizer
    env = SlowEnv(SyntheticConfig(tool_timeout_s=2.0))
    tasks = make_tasks("train", 3, seed=SEED % 1000 + 7, difficulty=3)
    sampling = SamplingConfig(n=2, max_new_tokens=200)

    def policy(request, ep, turn):
        script = gold_texts(tasks[ep // 2])
        if ep == 0:
            script = [HERMES.render_call("slow", {"x": 1})] + script  # a slow first turn
        return script[min(turn, len(script) - 1)]
    engine = ScriptedEngine(tok, policy, batch=2, seed=SEED)
    trajs = generate_episodes(engine, env, tasks, sampling)
    assert all(t.stop_reason == "answer" for t in trajs)
    adds = [rid for what, rid in engine.log if what == "add"]
    slow_next = adds.index("0:1")
    for ep in range(1, len(trajs)):
        last = f"{ep}:{trajs[ep].num_turns - 1}"
        assert adds.index(last) < slow_next, (ep, adds)


def test_token_limits_are_recorded(hf):
    tok = hf.tokenizer
    env = SyntheticEnv()
    tasks = make_tasks("train", 2, seed=SEED % 1000 + 3, difficulty=2)
    long_turn = "word " * 80
    engine = ScriptedEngine(tok, lambda r, ep, turn: long_turn if ep % 2 else
                            gold_texts(tasks[ep // 2])[min(turn, 2)])
    trajs = generate_episodes(engine, env, tasks, SamplingConfig(n=2, max_new_tokens=30))
    for t in trajs[1::2]:
        assert t.stop_reason == "max_new_tokens" and t.truncated and t.format_error
        assert t.segments[-1].role is Role.ASSISTANT and len(t.segments[-1]) == 30
        assert t.segments[-1].token_ids[-1] != tok.eos_token_id
    # A total budget that runs out mid-episode.
    prompt_len = len(trajs[0].prompt_ids)
    budget = prompt_len + len(trajs[0].segments[1]) + 5
    engine = ScriptedEngine(tok, lambda r, ep, turn: gold_texts(tasks[ep // 2])[min(turn, 2)])
    short = generate_episodes(engine, env, tasks[:1],
                              SamplingConfig(n=1, max_new_tokens=100, max_total_tokens=budget))[0]
    assert short.stop_reason == "max_total_tokens"
    assert len(short) <= budget
    with pytest.raises(ValueError, match=tasks[0].id):
        generate_episodes(engine, env, tasks[:1], SamplingConfig(max_total_tokens=prompt_len))


def test_stop_at_tool_close_puts_end_of_turn_in_glue(hf):
    tok = hf.tokenizer
    env = SyntheticEnv()
    tasks = make_tasks("train", 3, seed=SEED % 1000 + 5, difficulty=3)
    engine = ScriptedEngine(tok, lambda r, ep, turn: gold_texts(tasks[ep])[min(turn, 3)])
    trajs = generate_episodes(engine, env, tasks, SamplingConfig(stop_at_tool_close=True))
    close = tok.convert_tokens_to_ids("</tool_call>")
    for task, t in zip(tasks, trajs):
        assert t.token_ids.tolist() == expected_rendering(tok, env, task, t)
        for s, nxt in zip(t.segments, t.segments[1:]):
            if s.role is Role.ASSISTANT:
                assert s.token_ids.tolist().count(close) <= 1  # one call per turn
                if s.token_ids[-1] == close:
                    assert nxt.role is Role.OBSERVATION and nxt.token_ids[0] == tok.eos_token_id


# ---- episode driver with the real (transformers) engine ---------------------------------------

def check_structure(t, tok, env, task, sampling):
    assert t.segments[0].role is Role.PROMPT
    assert t.prompt_ids.tolist() == render_prompt(tok, env.reset(task).messages,
                                                  tools=env.tools(task))
    assert t.stop_reason in ("answer", "env_done", "max_turns", "max_new_tokens",
                             "max_total_tokens")
    assert 1 <= t.num_turns <= sampling.max_turns
    assert len(t.assistant_spans()) == t.num_turns
    for s in t.segments:
        if s.role is Role.ASSISTANT:
            assert s.logprobs is not None and np.all(s.logprobs <= 0)
            assert 1 <= len(s) <= sampling.max_new_tokens
    assert len(t) <= sampling.max_total_tokens + 2  # + the closing turn's template tail
    assert t.truncated == (t.segments[-1].role is Role.ASSISTANT
                           and t.segments[-1].token_ids[-1] != tok.eos_token_id)


def test_hf_episodes_run_multi_turn(hf):
    env = SyntheticEnv(SyntheticConfig(max_turns=6))
    tasks = make_tasks("train", 3, seed=SEED % 1000 + 11)
    sampling = SamplingConfig(n=3, num_hinted=1, temperature=1.0, max_new_tokens=40,
                              max_turns=4, max_total_tokens=1200, seed=SEED)
    trajs = generate_episodes(hf, env, tasks, sampling)
    assert len(trajs) == 9
    for i, t in enumerate(trajs):
        check_structure(t, hf.tokenizer, env, tasks[i // 3], sampling)
    assert max(t.num_turns for t in trajs) > 1  # the turn-ending model closes its turns
    check_versions(trajs, current_version=0)


# ---- experts and versions --------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "content_shift", "format_shift"])
def test_expert_trajectory_is_the_template_rendering(hf, split):
    tok = hf.tokenizer
    env = SyntheticEnv()
    for task in make_tasks(split, 3, seed=SEED % 1000 + 13):
        t = expert_trajectory(env, task, tok)
        msgs = env.gold_messages(task)
        full = tok.apply_chat_template(msgs, tools=env.tools(task), tokenize=True,
                                       return_dict=False)
        assert t.is_expert and t.weight_version is None
        assert t.token_ids.tolist() == full
        texts = [tok.decode(t.token_ids[a:b]) for a, b in t.assistant_spans()]
        assert texts == [x + "<|im_end|>" for x in gold_texts(task)]
        # Exactly what a model would generate: the canonical encoding of the turn text.
        for a, b in t.assistant_spans():
            assert tok.encode(tok.decode(t.token_ids[a:b]),
                              add_special_tokens=False) == t.token_ids[a:b].tolist()
        assert set(t.kinds[np.concatenate([np.arange(a, b) for a, b in
                                           t.assistant_spans()])].tolist()) == {2}  # SFT
        assert t.reward == pytest.approx(1.2) and not t.format_error


def test_check_versions(hf):
    env = SyntheticEnv()
    task = make_tasks("train", 1, seed=SEED % 1000)[0]
    engine = ScriptedEngine(hf.tokenizer, lambda r, ep, turn: gold_texts(task)[turn])
    engine.weight_version = 3
    trajs = generate_episodes(engine, env, [task], SamplingConfig(n=2))
    trajs.append(expert_trajectory(env, task, hf.tokenizer))
    assert [t.weight_version for t in trajs] == [3, 3, None]
    check_versions(trajs, 3)
    check_versions(trajs, 4, max_lag=1)
    with pytest.raises(StaleTrajectoryError, match=rf"trajectory 0 \(task '{task.id}'.*lag 1"):
        check_versions(trajs, 4)
    with pytest.raises(StaleTrajectoryError, match="newer"):
        check_versions(trajs, 2)
    trajs[1].weight_version = None
    with pytest.raises(StaleTrajectoryError, match="trajectory 1 .*no weight_version"):
        check_versions(trajs, 3)


def test_env_failure_names_the_episode_and_aborts_requests(hf):
    class BrokenEnv(SyntheticEnv):
        def step(self, state, text):
            if len(state.turns) == 1 and state.task.id.endswith("-1"):
                raise KeyError("simulator bug")
            return super().step(state, text)
    tasks = make_tasks("train", 3, seed=SEED % 1000 + 19, difficulty=3)
    engine = ScriptedEngine(hf.tokenizer, lambda r, ep, turn: gold_texts(tasks[ep // 2])[turn])
    name = rf"task {tasks[1].id} \(rollout \d, turn 1\).*simulator"
    with pytest.raises(RuntimeError, match=name):
        generate_episodes(engine, BrokenEnv(), tasks, SamplingConfig(n=2))
    assert not engine.has_unfinished()
