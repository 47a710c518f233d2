"""Tools: plain Python functions with JSON-schema specs, argument validation, safe execution.

A `Tool` wraps a function and its spec in the format `tokenizer.apply_chat_template(tools=[...])`
accepts: `{"type": "function", "function": {"name", "description", "parameters"}}`. The spec is
derived from type hints and a Google-style docstring (`Args:` section) unless given explicitly.

`ToolExecutor.run` executes parsed calls with a per-call timeout in a thread pool: concurrently
for stateless tools, in order for stateful ones (a file-system `cd` then `ls` must not race).
Nothing raises out of it: a bad argument, an exception or a timeout becomes an error string for
the model, with a flag saying which kind it was.
"""
from __future__ import annotations

import inspect
import json
import re
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean",
               list: "array", tuple: "array", dict: "object"}


def _type_schema(hint: Any, where: str) -> dict:
    """JSON schema of one type hint; raises naming `where` for a hint it cannot express."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _type_schema(non_none[0], where)
        return {"anyOf": [_type_schema(a, where) for a in non_none]}
    if origin is typing.Literal:
        values = list(args)
        base = _JSON_TYPES.get(type(values[0]))
        return ({"type": base} if base else {}) | {"enum": values}
    if origin in (list, tuple, set, frozenset):
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _type_schema(args[0], where)
        return out
    if origin is dict:
        return {"type": "object"}
    raise TypeError(f"{where}: cannot express type hint {hint!r} as JSON schema")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {arg: description}) from a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    summary_lines, arg_docs, section, current = [], {}, None, None
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            section = "args"
            continue
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):  # Returns:, Raises:, ...
            section = "other"
            continue
        if section is None:
            if stripped:
                summary_lines.append(stripped)
        elif section == "args" and stripped:
            m = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and line.startswith((" ", "\t")) and not line.startswith(" " * 8):
                current = m.group(1)
                arg_docs[current] = m.group(3)
            elif current:
                arg_docs[current] += " " + stripped
    return " ".join(summary_lines), arg_docs


def schema_from_function(fn: Callable, name: str | None = None) -> dict:
    """Chat-template tool spec derived from fn's signature, type hints and docstring."""
    name = name or fn.__name__
    summary, arg_docs = _docstring_parts(fn.__doc__ or "")
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name}: *args/**kwargs parameter {pname!r} has no JSON schema")
        prop = _type_schema(hints.get(pname, param.annotation), f"tool {name}, argument {pname}")
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        props[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    return {"type": "function", "function": {
        "name": name, "description": summary,
        "parameters": {"type": "object", "properties": props, "required": required}}}


def _matches(value: Any, schema: dict) -> bool:
    if "anyOf" in schema:
        return any(_matches(value, s) for s in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    t = schema.get("type")
    if isinstance(t, list):
        return any(_matches(value, {**schema, "type": x}) for x in t)
    if t is None:
        return True
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        items = schema.get("items")
        return isinstance(value, list) and (not items or all(_matches(v, items) for v in value))
    if t == "null":
        return value is None
    return True  # a type word this validator does not know: accept rather than misjudge


def validate_arguments(spec: dict, arguments: Any, check_types: bool = True) -> list[str]:
    """Problems with `arguments` against a tool spec, each naming the bad argument; [] if fine.
    `check_types=False` checks only names (missing required, unknown)."""
    fn = spec["function"]
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    if not isinstance(arguments, dict):
        return [f"arguments of {fn['name']} must be a JSON object, got {type(arguments).__name__}"]
    problems = []
    for req in params.get("required") or []:
        if req not in arguments:
            problems.append(f"missing required argument {req!r} of {fn['name']}")
    for key, value in arguments.items():
        if key not in props:
            problems.append(f"unknown argument {key!r} of {fn['name']} "
                            f"(expected one of {sorted(props)})")
        elif check_types and not _matches(value, props[key]):
            want = props[key].get("type") or props[key].get("enum") or "a valid value"
            problems.append(f"argument {key!r} of {fn['name']} must be {want}, "
                            f"got {json.dumps(value)[:80]}")
    return problems


@dataclass
class Tool:
    """A callable plus its chat-template spec."""
    fn: Callable[..., Any]
    spec: dict

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def tool(fn: Callable | None = None, *, name: str | None = None, spec: dict | None = None):
    """Decorator: `@tool` or `@tool(name=...)` turns a function into a `Tool`."""
    def wrap(f: Callable) -> Tool:
        return Tool(fn=f, spec=spec or schema_from_function(f, name))
    return wrap(fn) if fn is not None else wrap


@dataclass
class ToolRegistry:
    """Name -> Tool. `specs()` is what goes into `apply_chat_template(tools=...)`."""
    tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, fn: Callable | Tool, *, name: str | None = None,
                 spec: dict | None = None) -> Tool:
        t = fn if isinstance(fn, Tool) else tool(fn, name=name, spec=spec)
        if t.name in self.tools:
            raise ValueError(f"tool {t.name!r} is already registered")
        self.tools[t.name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        return self.tools[name]

    def names(self) -> list[str]:
        return list(self.tools)

    def specs(self) -> list[dict]:
        return [t.spec for t in self.tools.values()]


@dataclass
class ToolResult:
    """What one call produced. `content` is what the model sees; `error` is None on success, else
    one of "format" (unknown tool, bad arguments: the model's fault), "exception", "timeout"."""
    name: str
    content: str
    error: str | None = None
    value: Any = None  # the raw return value, for checkers


def default_to_text(value: Any) -> str:
    """str as is; everything else as JSON (falling back to str for non-JSON types)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


@dataclass
class ToolExecutor:
    """Runs calls with per-call timeouts. `parallel=False` keeps call order for stateful tools.

    A call that times out keeps running in its (abandoned) thread: Python cannot kill threads, so
    tools must not block forever. Each `run` uses a fresh pool so a stuck call cannot starve the
    next turn."""
    timeout_s: float = 5.0
    max_output_chars: int = 4000
    parallel: bool = True
    max_workers: int = 8
    check_types: bool = True
    to_text: Callable[[Any], str] = default_to_text

    def _truncate(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[: self.max_output_chars] + f"... [truncated {len(text) - self.max_output_chars} chars]"

    def _check(self, registry: ToolRegistry, name: str, arguments: Any) -> str | None:
        if name not in registry:
            return f"Error: unknown tool {name!r}; available tools: {', '.join(registry.names())}"
        problems = validate_arguments(registry[name].spec, arguments, self.check_types)
        return "Error: " + "; ".join(problems) if problems else None

    def _finish(self, name: str, future, deadline_s: float) -> ToolResult:
        try:
            value = future.result(timeout=deadline_s)
        except FutureTimeout:
            return ToolResult(name, f"Error: tool {name!r} timed out after {self.timeout_s:g} s",
                              "timeout")
        except Exception as e:  # the tool's own failure: report it to the model, keep going
            return ToolResult(name, self._truncate(f"Error: {name} raised {type(e).__name__}: {e}"),
                              "exception")
        try:
            text = self.to_text(value)
        except Exception as e:
            return ToolResult(name, f"Error: result of {name} is not printable: {e}", "exception")
        return ToolResult(name, self._truncate(text), None, value)

    def run(self, registry: ToolRegistry, calls: list[tuple[str, Any]]) -> list[ToolResult]:
        """Execute (name, arguments) pairs; results in the same order as calls."""
        results: list[ToolResult | None] = [None] * len(calls)
        todo = []
        for i, (name, args) in enumerate(calls):
            err = self._check(registry, name, args)
            if err:
                results[i] = ToolResult(name, self._truncate(err), "format")
            else:
                todo.append(i)
        if not todo:
            return results  # type: ignore[return-value]
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo)) if self.parallel else 1)
        try:
            if self.parallel:
                start = time.monotonic()
                futures = {i: pool.submit(registry[calls[i][0]].fn, **calls[i][1]) for i in todo}
                for i in todo:  # one shared deadline: the calls ran side by side
                    left = max(0.0, start + self.timeout_s - time.monotonic())
                    results[i] = self._finish(calls[i][0], futures[i], left)
            else:
                timed_out = False
                for i in todo:
                    name = calls[i][0]
                    if timed_out:  # state may be half-changed by the stuck call: do not pile on
                        results[i] = ToolResult(name, f"Error: {name} skipped after an earlier "
                                                "call timed out", "timeout")
                        continue
                    results[i] = self._finish(name, pool.submit(registry[name].fn, **calls[i][1]),
                                              self.timeout_s)
                    timed_out = results[i].error == "timeout"
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results  # type: ignore[return-value]
