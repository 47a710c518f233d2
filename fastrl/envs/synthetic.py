"""An embedded, seeded, offline tool-use environment: arithmetic over a small key-value store.

A task is a chain such as `Start with "r7", add 12, multiply by "r31", subtract 3.`, where
`r7` and `r31` are keys of a per-task store. Tools: `add`, `sub`, `mul`, whose operands are integers or store
keys (the tool reads a key's value), and `lookup(key)`. The gold trajectory does one operation
per turn, each on the previous result, then answers `<answer>N</answer>`; a task of difficulty 1
is either one operation or a single lookup. Difficulty = number of tool calls in the gold
trajectory.

Why operands may be keys: every argument of the gold trajectory is then either a literal of the
question or the previous tool result, which a small model can learn to copy within the CPU demo's
budget; resolving keys through separate lookups first would need a key -> value mapping across
turns that a tiny model does not pick up in minutes.

Splits (tasks are assigned to train or test by a hash of their content, so the two never share
a task whatever the seeds):

    train          difficulty 1-4, operands 1-50, Hermes `<tool_call>` syntax
    test           same distribution as train, disjoint tasks
    content_shift  operands 100-999 and 5-6 calls (unseen ranges, more steps), Hermes syntax
    format_shift   test-like content; calls use `<function=name>{json args}</function>`, described
                   in the system prompt, and the env parses that syntax

Where the tools are described (`SyntheticConfig.tool_specs`): "prompt" (default) names them in
the one-line system prompt (plus how to call them in a non-Hermes syntax), which keeps episodes
short; "template" passes the JSON specs to the chat template (`apply_chat_template(tools=...)`,
Hermes tasks) or writes them into the system prompt (format_shift), as a production model would
see them.

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
# Store keys are register-style names, "r1" ... "r99": a key is then the constant piece ` "r` and a
# number token, and the tiny model copies it with the circuit it learns for copying numbers. With
# word keys ("emu", "owl") each key is a rare token of its own; in a tied-embedding model those
# rare embeddings collapse onto one shared "key" direction (pairwise cosine ~0.9 after the SFT
# warm-up) and key copying stays at chance while number copying works.
KEYS = tuple(f"r{i}" for i in range(1, 100))
VERBS = {"add": "add", "sub": "subtract", "mul": "multiply by"}
# Short on purpose: every prompt token is paid for in every rollout and every training row.
SYSTEM_PROMPT = ("Calculator. Tools: add, sub, mul (a and b are integers or store keys), "
                 "lookup(key). One call per turn, then <answer>NUMBER</answer>.")
_APPLY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def make_tools(store: dict[str, int]) -> list:
    """The task's four tools, bound to its store."""
    def value(x: int | str) -> int:
        if isinstance(x, str):
            if x not in store:
                raise KeyError(f"no key {x!r} in the store")
            return store[x]
        return x

    def add(a: int | str, b: int | str) -> int:
        """Add two numbers.

        Args:
            a: An integer or a store key.
            b: An integer or a store key.
        """
        return value(a) + value(b)

    def sub(a: int | str, b: int | str) -> int:
        """Subtract b from a.

        Args:
            a: An integer or a store key.
            b: An integer or a store key.
        """
        return value(a) - value(b)

    def mul(a: int | str, b: int | str) -> int:
        """Multiply two numbers.

        Args:
            a: An integer or a store key.
            b: An integer or a store key.
        """
        return value(a) * value(b)

    def lookup(key: str) -> int:
        """Get the value stored under a key of the key-value store.

        Args:
            key: The key to look up.
        """
        return value(key)

    return [tool(f) for f in (add, sub, mul, lookup)]


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
    tool_specs: str = "prompt"     # "prompt" (one line) or "template" (JSON specs); see the module doc

    def __post_init__(self):
        if self.tool_specs not in ("prompt", "template"):
            raise ValueError(f"tool_specs must be 'prompt' or 'template', got {self.tool_specs!r}")


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


def _operand(x: int | str) -> str:
    # A key is quoted as in the JSON of a call, so `"r17"` tokenizes the same in the question and
    # in `"b": "r17"` (` "r` then `17`, see fastrl.models.tokenizer and KEYS).
    return f'"{x}"' if isinstance(x, str) else str(x)


def _sample(rng: random.Random, difficulty: int, lo: int, hi: int):
    """A chain whose gold trajectory uses exactly `difficulty` tool calls: `difficulty`
    operations, or for difficulty 1 sometimes a single lookup (no operations)."""
    if difficulty == 1 and rng.random() < 0.5:
        keys, ops_n = rng.sample(KEYS, 1), 0
    else:
        ops_n = difficulty
        keys = rng.sample(KEYS, rng.randint(0, min(2, difficulty)))
    operands: list[int | str] = [rng.randint(lo, hi) for _ in range(ops_n + 1)]
    for key, pos in zip(keys, rng.sample(range(ops_n + 1), len(keys))):
        operands[pos] = key
    if ops_n == 0:
        operands = keys[:1]
    ops = [(rng.choice(list(VERBS)), x) for x in operands[1:]]
    distractors = rng.sample([k for k in KEYS if k not in keys], rng.randint(2, 4))
    store = {k: rng.randint(lo, hi) for k in keys + distractors}
    store = dict(sorted(store.items()))
    return operands[0], ops, store


def _question(start, ops) -> str:
    if not ops:
        return f"What is the value stored under key {_operand(start)}?"
    steps = ", ".join(f"{VERBS[op]} {_operand(x)}" for op, x in ops)
    return f"Start with {_operand(start)}, {steps}."


def _gold(task: SyntheticTask, syntax: CallSyntax) -> tuple[list[dict], list[str]]:
    """Gold assistant/tool messages (after the prompt) and a plain-words solution path."""
    msgs, path = [], []

    def assistant(calls):
        if syntax is HERMES:
            return {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
        return {"role": "assistant", "content": syntax.render_turn(calls)}

    value = lambda x: task.store[x] if isinstance(x, str) else x  # noqa: E731
    if not task.ops:                       # a single lookup
        key = task.start
        msgs.append(assistant([("lookup", {"key": key})]))
        msgs.append({"role": "tool", "name": "lookup", "content": str(task.store[key])})
        path.append(f"lookup(key={key})")
        acc = task.store[key]
    else:
        acc, arg = value(task.start), task.start     # arg: what the call passes (a literal or the last result)
        for k, (op, x) in enumerate(task.ops):
            msgs.append(assistant([(op, {"a": arg, "b": x})]))
            acc = _APPLY[op](acc, value(x))
            msgs.append({"role": "tool", "name": op, "content": str(acc)})
            path.append(f"{op}(a={arg if k == 0 else 'result'}, b={x})")
            arg = acc
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
        question = _question(start, ops)
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
                     f"turn, then reply with <answer>NUMBER</answer>.")
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
        for t in make_tools(task.store):
            reg.register(t)
        return reg

    def system_prompt(self, task: SyntheticTask, hint: bool = False) -> str:
        text = SYSTEM_PROMPT
        syntax = SYNTAXES[task.syntax]
        if task.syntax != "hermes":          # Hermes is the chat template's own call format
            if self.config.tool_specs == "prompt":
                text += "\n" + syntax.instructions()
            else:
                text += "\n\n" + _tools_block(self.registry(task).specs(), syntax)
        if hint:
            text += "\n\nHint: " + task.hint
        return text

    def prompt_messages(self, task: SyntheticTask, hint: bool = False) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt(task, hint)},
                {"role": "user", "content": task.question}]

    def tools(self, task: SyntheticTask) -> list[dict] | None:
        """Specs for apply_chat_template; None where the system prompt describes the tools."""
        if self.config.tool_specs == "template" and task.syntax == "hermes":
            return self.registry(task).specs()
        return None

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
