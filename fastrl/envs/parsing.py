"""Parse one decoded assistant turn into tool calls, a final answer and format errors.

Two call syntaxes:

* `HERMES` (Qwen2.5 / Hermes, what the chat template renders)::

      <tool_call>
      {"name": "add", "arguments": {"a": 1, "b": 2}}
      </tool_call>

* `FUNCTION_TAG` (the format-shift split; Llama-3.1-style custom tool syntax)::

      <function=add>{"a": 1, "b": 2}</function>

Several calls per turn are allowed. A final answer is `<answer>...</answer>`. The parser never
raises: every problem becomes a message in `ParsedTurn.errors` (turn level: unclosed or stray
tags, JSON outside tags, control tokens that do not belong in an assistant turn, an empty or too
long turn) or in `ParsedCall.error` (bad JSON, missing name, non-object arguments, too long).
Those messages are written for the model: they go back to it as tool observations.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
# Control tokens that a well-formed assistant turn never contains.
FOREIGN_CONTROL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_response>",
                   "</tool_response>")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_POLLUTION = re.compile(r'\{\s*"name"\s*:')


@dataclass
class ParsedCall:
    name: str | None
    arguments: dict | None
    raw: str
    error: str | None = None


@dataclass
class ParsedTurn:
    text: str
    calls: list[ParsedCall] = field(default_factory=list)
    answer: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def call_errors(self) -> list[str]:
        return [c.error for c in self.calls if c.error]

    @property
    def format_ok(self) -> bool:
        return not self.errors and not self.call_errors

    @property
    def all_errors(self) -> list[str]:
        return self.errors + self.call_errors


def _dumps(obj: Any) -> str:
    # Same spelling as the chat template's `tojson` filter, so rendered text matches the template.
    return json.dumps(obj, ensure_ascii=False)


@dataclass(frozen=True)
class CallSyntax:
    """One tool-call syntax: how calls open/close, how the body reads, how to render a call."""
    name: str
    open_re: str             # regex of the opening tag; group 1 (if any) is the tool name
    close: str               # literal closing tag
    foreign: tuple[str, ...]  # markers of *other* syntaxes: using them is a format error
    max_chars: int = 16000
    max_call_chars: int = 4000
    max_calls: int = 8

    # ---- rendering -------------------------------------------------------------------------
    def render_call(self, name: str, arguments: dict) -> str:
        if self.name == "hermes":
            return f'<tool_call>\n{{"name": {_dumps(name)}, "arguments": {_dumps(arguments)}}}\n</tool_call>'
        return f"<function={name}>{_dumps(arguments)}</function>"

    def render_turn(self, calls: list[tuple[str, dict]], content: str = "") -> str:
        """Assistant text for content + calls, exactly as the chat template renders it (Hermes)."""
        parts = [self.render_call(n, a) for n, a in calls]
        return "\n".join(([content] if content else []) + parts)

    def instructions(self) -> str:
        """How to call tools in this syntax, for a system prompt."""
        if self.name == "hermes":
            return ("For each call, return a JSON object with the function name and arguments "
                    "inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": "
                    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
        return ("To call a function, write <function=NAME>ARGS</function> where NAME is the "
                "function name and ARGS its arguments as a JSON object, for example "
                "<function=add>{\"a\": 1, \"b\": 2}</function>. Several calls may follow each other.")

    # ---- parsing ---------------------------------------------------------------------------
    def _body(self, header_name: str | None, body: str) -> tuple[str | None, dict | None, str | None]:
        if len(body) > self.max_call_chars:
            return header_name, None, f"tool call too long ({len(body)} chars > {self.max_call_chars})"
        body = body.strip()
        if self.name == "hermes":
            if not body:
                return None, None, "empty tool call: expected {\"name\": ..., \"arguments\": {...}}"
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                return None, None, f"invalid JSON in tool call: {e.msg} at char {e.pos}"
            if not isinstance(obj, dict):
                return None, None, f"tool call must be a JSON object, got {type(obj).__name__}"
            name = obj.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                return None, None, f"tool call has no valid \"name\" (got {json.dumps(name)[:60]})"
            args = obj.get("arguments", {})
        else:
            name = header_name
            if not name or not _NAME.fullmatch(name):
                return None, None, f"invalid function name {name!r} in <function=...>"
            if not body:
                args = {}
            else:
                try:
                    args = json.loads(body)
                except json.JSONDecodeError as e:
                    return name, None, f"invalid JSON arguments for {name}: {e.msg} at char {e.pos}"
        if not isinstance(args, dict):
            return name, None, f"arguments of {name} must be a JSON object, got {type(args).__name__}"
        return name, args, None

    def parse(self, text: str) -> ParsedTurn:
        """Parse one assistant turn (decoded text; a trailing end-of-turn token is allowed)."""
        for eot in END_OF_TURN:
            if text.endswith(eot):
                text = text[: -len(eot)]
                break
        turn = ParsedTurn(text=text)
        if not text.strip():
            turn.errors.append("empty turn: expected a tool call or a final <answer>")
            return turn
        if len(text) > self.max_chars:
            turn.errors.append(f"turn too long ({len(text)} chars > {self.max_chars})")
            text = text[: self.max_chars]

        outside, pos = [], 0
        opens = list(re.finditer(self.open_re, text))
        for k, m in enumerate(opens):
            if m.start() < pos:  # inside a call already consumed
                continue
            outside.append(text[pos: m.start()])
            close_at = text.find(self.close, m.end())
            next_open = opens[k + 1].start() if k + 1 < len(opens) else len(text)
            opener = m.group(0)
            if close_at < 0 or close_at > next_open:
                turn.errors.append(f"unclosed {opener}: missing {self.close}")
                pos = next_open if close_at > next_open else len(text)
                continue
            raw = text[m.start(): close_at + len(self.close)]
            if len(turn.calls) >= self.max_calls:
                turn.calls.append(ParsedCall(None, None, raw, f"too many calls in one turn "
                                                              f"(max {self.max_calls})"))
            else:
                header = m.group(1) if m.groups() else None
                name, args, err = self._body(header, text[m.end(): close_at])
                turn.calls.append(ParsedCall(name, args, raw, err))
            pos = close_at + len(self.close)
        outside.append(text[pos:])
        rest = "".join(outside)

        if self.close in rest:
            turn.errors.append(f"stray {self.close} without an opening tag")
        for marker in self.foreign:
            if marker in rest:
                turn.errors.append(f"wrong call syntax: {marker} is not this environment's "
                                   f"syntax ({self.name}); {self.instructions()}")
                break
        for tok in FOREIGN_CONTROL:
            if tok in rest:
                turn.errors.append(f"control token {tok} does not belong inside an assistant turn")

        answers = re.findall(r"<answer>(.*?)</answer>", rest, flags=re.S)
        leftover = re.sub(r"<answer>.*?</answer>", "", rest, flags=re.S)
        if "<answer>" in leftover:
            turn.errors.append("unclosed <answer>: missing </answer>")
        elif "</answer>" in leftover:
            turn.errors.append("stray </answer> without <answer>")
        if len(answers) > 1:
            turn.errors.append(f"{len(answers)} <answer> blocks in one turn; give one final answer")
        if answers:
            turn.answer = answers[-1].strip()
            if turn.calls:
                turn.errors.append("a turn must either call tools or give the final <answer>, not both")
        if _POLLUTION.search(leftover):
            turn.errors.append("tool call JSON outside call tags: "
                               + self.instructions())
        return turn


HERMES = CallSyntax(name="hermes", open_re=r"<tool_call>", close="</tool_call>",
                    foreign=("<function=", "</function>"))
FUNCTION_TAG = CallSyntax(name="function_tag", open_re=r"<function=([^>\n]{0,200})>",
                          close="</function>", foreign=("<tool_call>", "</tool_call>"))
SYNTAXES = {s.name: s for s in (HERMES, FUNCTION_TAG)}
