"""BFCL multi-turn tasks (base, miss_func, miss_param, long_context) from the `bfcl-eval` package.

Data, function docs and ground truth come from the package's data files; calls run against its
stateful API simulators (file system, trading bot, travel booking, ...); correctness uses its own
multi-turn sub-checkers (`state_checker`, `response_checker`) with its rules: after every user
turn whose ground truth is non-empty, the model must have made calls in that turn, the simulator
states must equal the ground truth's, and the ground truth's execution results must all appear
among the model's results so far. Turns with empty ground truth are not checked (as in BFCL).

Differences from BFCL's own inference loop, on purpose:

* BFCL's executor `eval`s call strings. Here model calls are parsed as JSON (Hermes
  `<tool_call>` syntax), validated against the function docs and dispatched by name to the bound
  simulator methods; ground-truth strings are read with `ast` (literals only). No eval/exec.
* Functions held out in miss_func arrive in a user message (their JSON specs plus BFCL's "I have
  updated some more functions..." sentence), because the system prompt of a token-space
  conversation cannot change; the env accepts calls to them from that turn on.
* BFCL executes any public method of the involved simulators, even one not yet advertised (its
  own ground truth does so: multi_turn_miss_func_49 calls `tail` before it is added); so does this
  env. Argument names are validated (missing/unknown = format error); types are not by default
  (`BfclConfig.strict_types`), since the ground truth itself passes e.g. a string `ticket_id`
  where the doc says integer.
* A user turn ends when the model answers without calls; 20 assistant steps in one user turn end
  the episode as failed (BFCL's force-quit limit).

Only `bfcl_eval.constants.*` and `bfcl_eval.eval_checker.multi_turn_eval.*` are imported; they
need `mpmath` (math simulator) besides the standard library. Install with
`pip install --no-deps bfcl-eval==2026.3.23`.
"""
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastrl.envs.base import (EpisodeState, RewardWeights, StepResult, TurnInfo, combine_rewards,
                              format_error_message)
from fastrl.envs.parsing import HERMES
from fastrl.envs.tools import ToolExecutor, ToolRegistry, ToolResult, tool

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
MAX_STEPS_PER_TURN = 20
SYSTEM_PROMPT = ("You are an expert in composing functions. Complete the user's requests by calling "
                 "the available functions; you may need several calls and several steps. When a "
                 "request is complete, or cannot be completed with the functions and information "
                 "given, reply in plain text without a function call.")
END_OF_TURN_TEXT = "Done."
CANNOT_TEXT = ("I cannot complete this request with the available functions and information; "
               "please provide what is missing.")


def _bfcl():
    """The bfcl_eval pieces this env uses (imported lazily: the package is optional for fastrl)."""
    import bfcl_eval
    from bfcl_eval.constants import default_prompts, executable_backend_config
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker
    return bfcl_eval, executable_backend_config, multi_turn_checker, default_prompts


def data_dir() -> Path:
    return Path(_bfcl()[0].__file__).parent / "data"


_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "int": "integer",
             "str": "string", "bool": "boolean", "list": "array"}


def _convert_schema(s: dict) -> dict:
    """BFCL's Python-flavoured schema types -> JSON schema (what chat templates expect)."""
    out = {}
    for k, v in s.items():
        if k == "type":
            if v == "any":
                continue
            out[k] = _TYPE_MAP.get(v, v)
        elif k == "properties":
            out[k] = {name: _convert_schema(p) for name, p in v.items()}
        elif k == "items" and isinstance(v, dict):
            out[k] = _convert_schema(v)
        else:
            out[k] = v
    return out


def function_spec(doc: dict) -> dict:
    """A BFCL function doc as a chat-template tool spec."""
    return {"type": "function", "function": {
        "name": doc["name"], "description": doc.get("description", ""),
        "parameters": _convert_schema(doc.get("parameters", {"type": "dict", "properties": {}}))}}


@dataclass
class BfclTask:
    id: str
    category: str
    turns: list[list[dict]]              # user messages per turn ([] = held-out functions arrive)
    initial_config: dict
    involved_classes: list[str]
    functions: list[dict]                # BFCL docs available from the start
    missed: dict[int, list[dict]]        # turn index -> docs that arrive at that turn
    ground_truth: list[list[str]]        # BFCL call strings per turn

    @property
    def hint(self) -> str:
        steps = []
        for t, calls in enumerate(self.ground_truth):
            steps.append(f"turn {t + 1}: " + (", ".join(calls) if calls else
                                               "no call; say what is missing"))
        return ("Solution path: " + "; ".join(steps) + ". Call functions inside <tool_call></tool_call>"
                " tags as JSON; end each turn with a short plain-text reply.")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tasks(categories: tuple[str, ...] | list[str] = CATEGORIES, *,
               limit: int | None = None) -> list[BfclTask]:
    """BFCL multi-turn tasks of the given categories (each in file order, at most `limit` each)."""
    _, backend, _, _ = _bfcl()
    root = data_dir()
    docs: dict[str, list[dict]] = {}
    tasks = []
    for cat in categories:
        if cat not in CATEGORIES:
            raise ValueError(f"unknown BFCL multi-turn category {cat!r}; expected one of {CATEGORIES}")
        entries = _read_jsonl(root / f"BFCL_v4_multi_turn_{cat}.json")
        answers = {a["id"]: a["ground_truth"]
                   for a in _read_jsonl(root / "possible_answer" / f"BFCL_v4_multi_turn_{cat}.json")}
        for e in entries[:limit]:
            functions = []
            for cls in e["involved_classes"]:
                if cls not in docs:
                    docs[cls] = _read_jsonl(root / "multi_turn_func_doc"
                                            / backend.MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])
                functions.extend(docs[cls])
            missed = {}
            for turn, names in e.get("missed_function", {}).items():
                missed[int(turn)] = [f for f in functions if f["name"] in names]
                functions = [f for f in functions if f["name"] not in names]
            tasks.append(BfclTask(id=e["id"], category=cat, turns=e["question"],
                                  initial_config=e.get("initial_config", {}),
                                  involved_classes=list(e["involved_classes"]),
                                  functions=functions, missed=missed,
                                  ground_truth=answers[e["id"]]))
    return tasks


def make_instances(task: BfclTask) -> dict[str, object]:
    """Fresh simulator instances in the task's initial state (BFCL's own loading)."""
    _, backend, _, _ = _bfcl()
    out = {}
    for cls_name in task.involved_classes:
        cls = getattr(importlib.import_module(backend.CLASS_FILE_PATH_MAPPING[cls_name]), cls_name)
        inst = cls()
        if cls_name not in backend.STATELESS_CLASSES:
            inst._load_scenario(copy.deepcopy(task.initial_config.get(cls_name, {})),
                                long_context=task.category == "long_context")
        out[cls_name] = inst
    return out


def _methods(instances: dict[str, object]) -> dict[str, object]:
    methods = {}
    for inst in instances.values():
        for name, m in inspect.getmembers(inst, predicate=inspect.ismethod):
            if not name.startswith("_"):
                methods[name] = m
    return methods


def _registry(instances: dict[str, object], docs: list[dict]) -> ToolRegistry:
    methods = _methods(instances)
    reg = ToolRegistry()
    for d in docs:
        if d["name"] in methods:
            reg.register(tool(methods[d["name"]], spec=function_spec(d)))
    return reg


def bfcl_result_text(value) -> str:
    """Result -> text as BFCL's executor does it (so response checks compare like with like)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def parse_call_string(call: str, methods: dict[str, object]) -> tuple[str, dict]:
    """A ground-truth string like "mv(source='a', destination='b')" or "sort('f')" -> (name,
    kwargs), reading literals only; positional arguments are named from the method signature."""
    node = ast.parse(call.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {call!r}")
    name = node.func.id
    kwargs = {}
    if node.args:
        if name not in methods:
            raise ValueError(f"unknown function {name!r} in {call!r}")
        params = [p for p in inspect.signature(methods[name]).parameters]
        for p, a in zip(params, node.args):
            kwargs[p] = ast.literal_eval(a)
    for kw in node.keywords:
        kwargs[kw.arg] = ast.literal_eval(kw.value)
    return name, kwargs


def call_string(name: str, arguments: dict) -> str:
    """(name, kwargs) -> BFCL's call-string form, e.g. for its offline checker."""
    return f"{name}(" + ",".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"


@dataclass
class BfclConfig:
    weights: RewardWeights = field(default_factory=RewardWeights)
    system_prompt: str = SYSTEM_PROMPT
    max_steps_per_turn: int = MAX_STEPS_PER_TURN
    tool_timeout_s: float = 5.0
    max_output_chars: int = 8000
    strict_types: bool = False
    max_call_chars: int = 32000   # long_context tasks write long file contents
    max_calls: int = 64           # and some ground-truth turns make dozens of calls


def _all_docs(task: BfclTask) -> list[dict]:
    return task.functions + [d for v in task.missed.values() for d in v]


class BfclEnv:
    """BFCL multi-turn episodes; the loop is the one of fastrl.envs.base."""

    def __init__(self, config: BfclConfig | None = None):
        self.config = config or BfclConfig()
        # Stateful simulators: calls of a turn run in order.
        self.executor = ToolExecutor(timeout_s=self.config.tool_timeout_s,
                                     max_output_chars=self.config.max_output_chars,
                                     parallel=False, to_text=bfcl_result_text,
                                     check_types=self.config.strict_types)
        self.syntax = replace(HERMES, max_call_chars=self.config.max_call_chars,
                              max_calls=self.config.max_calls,
                              max_chars=max(HERMES.max_chars, 4 * self.config.max_call_chars))

    # ---- prompts -------------------------------------------------------------------------
    def _system(self, task: BfclTask, hint: bool) -> str:
        return self.config.system_prompt + (f"\n\nHint: {task.hint}" if hint else "")

    def _user_turn(self, task: BfclTask, t: int) -> list[dict]:
        if t in task.missed:
            prompts = _bfcl()[3]
            specs = "\n".join(json.dumps(function_spec(d)) for d in task.missed[t])
            return [{"role": "user", "content": f"<tools>\n{specs}\n</tools>\n"
                     + prompts.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC}]
        return [dict(m) for m in task.turns[t]]

    def tools(self, task: BfclTask) -> list[dict]:
        return [function_spec(d) for d in task.functions]

    # ---- episode ---------------------------------------------------------------------------
    def reset(self, task: BfclTask, *, hint: bool = False) -> EpisodeState:
        msgs = [{"role": "system", "content": self._system(task, hint)}] + self._user_turn(task, 0)
        model, gt = make_instances(task), make_instances(task)
        return EpisodeState(task=task, messages=msgs, tools=self.tools(task),
                            hint=task.hint if hint else None, extra={
                                "num_prompt_messages": len(msgs),
                                "instances": model, "gt_instances": gt,
                                "registry": _registry(model, _all_docs(task)),
                                "gt_registry": _registry(gt, _all_docs(task)),
                                "turn": 0, "steps_in_turn": 0,
                                "decoded": [[]],        # per user turn, per step: call strings
                                "model_results": [],    # all model execution results so far
                                "turn_valid": [], "turn_errors": [], "force_quit": False})

    def _end_user_turn(self, state: EpisodeState) -> None:
        """Run the turn's ground truth on the reference instances and apply BFCL's checks."""
        _, _, checker, _ = _bfcl()
        x, task = state.extra, state.task
        t = x["turn"]
        gt_calls = task.ground_truth[t]
        methods = _methods(x["gt_instances"])
        parsed = [parse_call_string(c, methods) for c in gt_calls]  # fresh objects per run
        gt_results = [r.content for r in self.executor.run(x["gt_registry"], parsed)]
        if not gt_calls:  # BFCL does not check turns whose ground truth is empty
            valid, err = True, None
        elif not x["decoded"][t]:
            valid, err = False, f"no function call in turn {t}"
        else:
            res = checker.state_checker(x["instances"], x["gt_instances"])
            if res["valid"]:
                res = checker.response_checker(x["model_results"], gt_results, t)
            valid, err = res["valid"], None if res["valid"] else res["error_message"]
        x["turn_valid"].append(valid)
        x["turn_errors"].append(err)

    def step(self, state: EpisodeState, assistant_text: str) -> StepResult:
        if state.done:
            raise ValueError(f"episode of task {state.task.id} is already done")
        x, task = state.extra, state.task
        parsed = self.syntax.parse(assistant_text)
        state.messages.append({"role": "assistant", "content": parsed.text})
        info = TurnInfo(index=len(state.turns), format_ok=parsed.format_ok,
                        format_errors=parsed.all_errors, num_calls=len(parsed.calls),
                        answer=parsed.answer)
        state.turns.append(info)
        obs: list[dict] = []
        # Calls, or a broken attempt at one (unclosed tag, bare JSON...): answer and stay in the
        # user turn. Only a clean text reply (or an empty turn) ends the user turn.
        if parsed.calls or (parsed.errors and parsed.text.strip()):
            good = [c for c in parsed.calls if c.error is None]
            results: list[ToolResult] = self.executor.run(x["registry"],
                                                          [(c.name, c.arguments) for c in good])
            it = iter(results)
            executed = []
            for call in parsed.calls:
                if call.error is not None:
                    obs.append({"role": "tool", "name": call.name or "unknown",
                                "content": "Error: " + call.error})
                    continue
                res = next(it)
                obs.append({"role": "tool", "name": call.name, "content": res.content})
                if res.error == "format":
                    info.format_ok = False
                    info.format_errors.append(res.content)
                    continue
                if res.error:
                    info.tool_errors.append(res.content)
                executed.append(call_string(call.name, call.arguments))
                x["model_results"].append(res.content)
            if executed:
                x["decoded"][x["turn"]].append(executed)
            if parsed.errors:
                obs.append(format_error_message(parsed.errors))
            x["steps_in_turn"] += 1
            if x["steps_in_turn"] >= self.config.max_steps_per_turn:
                x["force_quit"] = True
                state.done = True
                return StepResult(None, True, info.as_dict() | {"force_quit": True})
            state.messages.extend(obs)
            return StepResult(obs, False, info.as_dict())

        # No call: the user turn is over.
        if not parsed.text.strip():
            info.format_ok = False  # already flagged "empty turn" by the parser
        self._end_user_turn(state)
        x["turn"] += 1
        x["steps_in_turn"] = 0
        if x["turn"] >= len(task.turns):
            state.done = True
            return StepResult(None, True, info.as_dict() | {"turn_valid": x["turn_valid"][-1]})
        x["decoded"].append([])
        obs = self._user_turn(task, x["turn"])
        state.messages.extend(obs)
        return StepResult(obs, False, info.as_dict() | {"turn_valid": x["turn_valid"][-1]})

    def is_correct(self, state: EpisodeState) -> bool:
        x = state.extra
        return (state.done and not x["force_quit"] and len(x["turn_valid"]) == len(state.task.turns)
                and all(x["turn_valid"]))

    def reward(self, state: EpisodeState) -> dict:
        r = combine_rewards(state.turns, float(self.is_correct(state)), self.config.weights)
        r["turn_valid"] = list(state.extra["turn_valid"])
        return r

    def decoded_calls(self, state: EpisodeState) -> list[list[list[str]]]:
        """The model's executed calls per user turn and step, as BFCL call strings (the input of
        BFCL's offline `multi_turn_checker`)."""
        return [list(map(list, turn)) for turn in state.extra["decoded"]]

    # ---- supervision -------------------------------------------------------------------------
    def gold_messages(self, task: BfclTask, *, hint: bool = False) -> list[dict]:
        """Expert conversation: per user turn, all ground-truth calls in one assistant message,
        their results (from fresh simulators), then a short plain-text end of turn."""
        instances = make_instances(task)
        registry = _registry(instances, _all_docs(task))
        methods = _methods(instances)
        msgs = [{"role": "system", "content": self._system(task, hint)}]
        for t, gt in enumerate(task.ground_truth):
            msgs += self._user_turn(task, t)
            if gt:
                calls = [parse_call_string(c, methods) for c in gt]
                msgs.append({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]})
                # Simulators keep argument lists by reference (post_tweet's mentions, later
                # extended by mention): run on copies so the gold messages stay as called.
                for (n, _), r in zip(calls, self.executor.run(registry, copy.deepcopy(calls))):
                    msgs.append({"role": "tool", "name": n, "content": r.content})
            msgs.append({"role": "assistant", "content": END_OF_TURN_TEXT if gt else CANNOT_TEXT})
        return msgs
