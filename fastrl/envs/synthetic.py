"""An embedded, seeded, offline tool-use environment: arithmetic over a small key-value store.

A task is a left-to-right chain such as `Compute ((red + 12) * owl) - 3`, where `red` and `owl`
are keys of a per-task store. Tools: `add`, `sub`, `mul` (integers) and `lookup(key)`. The gold
trajectory looks all keys up in one turn (parallel calls), then does one operation per turn,
then answers `<answer>N</answer>`. Difficulty = number of tool calls in the gold trajectory.

Splits (tasks are assigned to train or test by a hash of their content, so the two never share
a task whatever the seeds):

    train          difficulty 1-4, operands 1-50, Hermes `<tool_call>` syntax
    test           same distribution as train, disjoint tasks
    content_shift  operands 100-999 and 5-6 calls (unseen ranges, more steps), Hermes syntax
    format_shift   test-like content; calls use `<function=name>{json args}</function>`, described
                   in the system prompt (state.tools is None: the chat template's Hermes tool
                   block is not used), and the env parses that syntax

Each task carries a hint (solution path + required format) for hint-based guidance.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field

from fastrl.envs.base import (EpisodeState, RewardWeights, StepResult, TurnInfo, combine_rewards,
                              format_error_message)
from fastrl.envs.parsing import HERMES, SYNTAXES, CallSyntax
from fastrl.envs.tools import ToolExecutor, ToolRegistry, tool

SPLITS = ("train", "test", "content_shift", "format_shift")
KEYS = ("red blue green yellow orange purple black white gray pink brown cyan apple pear plum "
        "grape lemon lime mango peach cherry melon kiwi fig cat dog fox owl bee ant cow pig hen "
        "yak elk emu").split()
OPS = {"add": "+", "sub": "-", "mul": "*"}
SYSTEM_PROMPT = ("You are a careful calculator assistant. Use the tools for every lookup and "
                 "every arithmetic step; never compute in your head. Lookups that do not depend on "
                 "each other can go in the same turn. When you have the result, reply with only "
                 "<answer>NUMBER</answer>.")


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: First operand.
        b: Second operand.
    """
    return a + b


@tool
def sub(a: int, b: int) -> int:
    """Subtract b from a.

    Args:
        a: The minuend.
        b: The subtrahend.
    """
    return a - b


@tool
def mul(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: First factor.
        b: Second factor.
    """
    return a * b


def make_lookup(store: dict[str, int]):
    def lookup(key: str) -> int:
        """Get the value stored under a key of the key-value store.

        Args:
            key: The key to look up.
        """
        if key not in store:
            raise KeyError(f"no key {key!r} in the store")
        return store[key]
    return tool(lookup)


@dataclass
class SyntheticTask:
    id: str
    split: str
    question: str
    store: dict[str, int]
    start: int | str                      # first operand: a constant or a store key
    ops: list[tuple[str, int | str]]      # (op name, constant or store key), applied left to right
    answer: int
    syntax: str = "hermes"
    difficulty: int = 1
    hint: str = ""
    gold_messages: list[dict] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """Store keys the task needs, in order of first use."""
        out = []
        for x in [self.start] + [v for _, v in self.ops]:
            if isinstance(x, str) and x not in out:
                out.append(x)
        return out


@dataclass
class SyntheticConfig:
    max_turns: int = 8
    weights: RewardWeights = field(default_factory=RewardWeights)
    tool_timeout_s: float = 2.0
    max_output_chars: int = 2000


def _split_params(split: str) -> tuple[tuple[int, int], tuple[int, int], str]:
    """(difficulty range, operand range, syntax) of a split."""
    if split in ("train", "test"):
        return (1, 4), (1, 50), "hermes"
    if split == "content_shift":
        return (5, 6), (100, 999), "hermes"
    if split == "format_shift":
        return (1, 4), (1, 50), "function_tag"
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _is_test(question: str, store: dict[str, int]) -> bool:
    digest = hashlib.sha1(json.dumps([question, store], sort_keys=True).encode()).digest()
    return digest[0] % 5 == 0  # ~20% of the in-distribution task space is held out


def _expr(start: int | str, ops: list[tuple[str, int | str]]) -> str:
    text = str(start)
    for i, (op, x) in enumerate(ops):
        text = f"({text} {OPS[op]} {x})" if i < len(ops) - 1 else f"{text} {OPS[op]} {x}"
    return text


def _sample(rng: random.Random, difficulty: int, lo: int, hi: int):
    """A chain whose gold trajectory uses exactly `difficulty` tool calls."""
    if difficulty == 1:
        n_keys = rng.randint(0, 1)
        n_ops = 1 - n_keys
    else:
        n_keys = rng.randint(0, min(2, difficulty - 1))
        n_ops = difficulty - n_keys
    keys = rng.sample(KEYS, n_keys)
    operands: list[int | str] = [rng.randint(lo, hi) for _ in range(n_ops + 1)]
    for key, pos in zip(keys, rng.sample(range(n_ops + 1), n_keys)):
        operands[pos] = key
    if n_ops == 0:
        operands = keys[:1]
    ops = [(rng.choice(list(OPS)), x) for x in operands[1:]]
    distractors = rng.sample([k for k in KEYS if k not in keys], rng.randint(2, 4))
    store = {k: rng.randint(lo, hi) for k in keys + distractors}
    store = dict(sorted(store.items()))
    return operands[0], ops, store


def _question(start, ops, keys) -> str:
    if not ops:
        return f"What is the value stored under key \"{start}\"?"
    q = f"Compute {_expr(start, ops)}"
    if keys:
        q += (f", where {keys[0]} is the value stored under that key" if len(keys) == 1 else
              f", where {' and '.join(keys)} are the values stored under those keys")
    return q + "."


def _gold(task: SyntheticTask, syntax: CallSyntax) -> tuple[list[dict], list[str]]:
    """Gold assistant/tool messages (after the prompt) and a plain-words solution path."""
    msgs, path = [], []

    def assistant(calls):
        if syntax is HERMES:
            return {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
        return {"role": "assistant", "content": syntax.render_turn(calls)}

    keys = task.keys
    if keys:
        msgs.append(assistant([("lookup", {"key": k}) for k in keys]))
        msgs += [{"role": "tool", "name": "lookup", "content": str(task.store[k])} for k in keys]
        path.append("lookup " + ", ".join(keys))
    value = lambda x: task.store[x] if isinstance(x, str) else x  # noqa: E731
    acc = value(task.start)
    acc_name = str(task.start)
    for op, x in task.ops:
        msgs.append(assistant([(op, {"a": acc, "b": value(x)})]))
        acc = {"add": acc + value(x), "sub": acc - value(x), "mul": acc * value(x)}[op]
        msgs.append({"role": "tool", "name": op, "content": str(acc)})
        path.append(f"{op}(a={acc_name}, b={x})")
        acc_name = "result"
    msgs.append({"role": "assistant", "content": f"<answer>{acc}</answer>"})
    return msgs, path


def _tools_block(specs: list[dict], syntax: CallSyntax) -> str:
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)
    return ("# Tools\n\nYou may call one or more functions. Their signatures are inside "
            f"<tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n{syntax.instructions()}")


def make_tasks(split: str, n: int, *, seed: int = 0,
               difficulty: int | tuple[int, int] | None = None) -> list[SyntheticTask]:
    """n tasks of a split, deterministic in (split, seed). `difficulty` (number of tool calls, an
    int or an inclusive range) overrides the split's default range."""
    diff_range, (lo, hi), syntax_name = _split_params(split)
    if difficulty is not None:
        diff_range = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
        if diff_range[0] < 1 or diff_range[1] < diff_range[0]:
            raise ValueError(f"difficulty must be >= 1 (or a range lo <= hi), got {difficulty!r}")
    syntax = SYNTAXES[syntax_name]
    rng = random.Random(f"fastrl-synthetic:{split}:{seed}")
    tasks, seen = [], set()
    while len(tasks) < n:
        d = rng.randint(*diff_range)
        start, ops, store = _sample(rng, d, lo, hi)
        keys = [x for x in [start] + [v for _, v in ops] if isinstance(x, str)]
        question = _question(start, ops, list(dict.fromkeys(keys)))
        if split in ("train", "test", "format_shift"):
            # format_shift reuses held-out (test) content, so only the syntax is new.
            if _is_test(question, store) != (split != "train"):
                continue
        sig = (question, tuple(store.items()))
        if sig in seen:
            continue
        seen.add(sig)
        task = SyntheticTask(id=f"{split}-{seed}-{len(tasks)}", split=split, question=question,
                             store=store, start=start, ops=ops, answer=0, syntax=syntax_name,
                             difficulty=d)
        gold, path = _gold(task, syntax)
        task.answer = int(re.search(r"<answer>(-?\d+)</answer>", gold[-1]["content"]).group(1))
        call_how = ("<tool_call> tags" if syntax is HERMES
                    else "<function=NAME>{json}</function>")
        task.hint = (f"Solution path: {'; '.join(path)}. Call tools with {call_how}, one step per "
                     f"turn (lookups together), then reply with <answer>NUMBER</answer>.")
        task.gold_messages = gold
        tasks.append(task)
    return tasks


class SyntheticEnv:
    """Runs SyntheticTask episodes; see the module docstring of fastrl.envs.base for the loop."""

    def __init__(self, config: SyntheticConfig | None = None):
        self.config = config or SyntheticConfig()
        self.executor = ToolExecutor(timeout_s=self.config.tool_timeout_s,
                                     max_output_chars=self.config.max_output_chars, parallel=True)

    def registry(self, task: SyntheticTask) -> ToolRegistry:
        reg = ToolRegistry()
        for t in (add, sub, mul, make_lookup(task.store)):
            reg.register(t)
        return reg

    def system_prompt(self, task: SyntheticTask, hint: bool = False) -> str:
        text = SYSTEM_PROMPT
        if hint:
            text += "\n\nHint: " + task.hint
        if task.syntax != "hermes":
            text += "\n\n" + _tools_block(self.registry(task).specs(), SYNTAXES[task.syntax])
        return text

    def prompt_messages(self, task: SyntheticTask, hint: bool = False) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt(task, hint)},
                {"role": "user", "content": task.question}]

    def tools(self, task: SyntheticTask) -> list[dict] | None:
        """Specs for apply_chat_template; None where the system prompt describes the tools."""
        return self.registry(task).specs() if task.syntax == "hermes" else None

    def gold_messages(self, task: SyntheticTask, hint: bool = False) -> list[dict]:
        """The full expert conversation (prompt + gold turns), ready for the chat template."""
        return self.prompt_messages(task, hint) + [dict(m) for m in task.gold_messages]

    def reset(self, task: SyntheticTask, *, hint: bool = False) -> EpisodeState:
        msgs = self.prompt_messages(task, hint)
        return EpisodeState(task=task, messages=msgs, tools=self.tools(task),
                            hint=task.hint if hint else None,
                            extra={"num_prompt_messages": len(msgs),
                                   "registry": self.registry(task), "answer": None})

    def step(self, state: EpisodeState, assistant_text: str) -> StepResult:
        if state.done:
            raise ValueError(f"episode of task {state.task.id} is already done")
        syntax = SYNTAXES[state.task.syntax]
        parsed = syntax.parse(assistant_text)
        state.messages.append({"role": "assistant", "content": parsed.text})
        info = TurnInfo(index=len(state.turns), format_ok=parsed.format_ok,
                        format_errors=parsed.all_errors, num_calls=len(parsed.calls),
                        answer=parsed.answer)

        obs: list[dict] = []
        good = [c for c in parsed.calls if c.error is None]
        results = iter(self.executor.run(state.extra["registry"],
                                         [(c.name, c.arguments) for c in good]))
        for call in parsed.calls:
            if call.error is not None:
                obs.append({"role": "tool", "name": call.name or "unknown",
                            "content": "Error: " + call.error})
                continue
            res = next(results)
            obs.append({"role": "tool", "name": call.name, "content": res.content})
            if res.error == "format":  # unknown tool or bad arguments: the model's format fault
                info.format_ok = False
                info.format_errors.append(res.content)
            elif res.error:
                info.tool_errors.append(res.content)
        if parsed.errors:
            obs.append(format_error_message(parsed.errors))
        if not parsed.calls and parsed.answer is None and not parsed.errors:
            info.format_ok = False
            msg = "expected a tool call or a final <answer>NUMBER</answer>"
            info.format_errors.append(msg)
            obs.append(format_error_message([msg]))

        state.turns.append(info)
        finished = parsed.answer is not None and not parsed.calls
        if finished:
            state.extra["answer"] = parsed.answer
        state.done = finished or len(state.turns) >= self.config.max_turns
        if not state.done:
            state.messages.extend(obs)
        return StepResult(None if state.done else obs, state.done, info.as_dict())

    def is_correct(self, state: EpisodeState) -> bool:
        ans = state.extra.get("answer")
        return ans is not None and re.fullmatch(r"[+-]?\d+", ans) is not None \
            and int(ans) == state.task.answer

    def reward(self, state: EpisodeState) -> dict:
        return combine_rewards(state.turns, float(self.is_correct(state)), self.config.weights)
