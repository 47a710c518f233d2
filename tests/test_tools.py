"""Tool specs from type hints/docstrings, argument validation, the executor (concurrency,
timeouts, exceptions) and the call parsers (Hermes and <function=...>) on good and broken text."""
import json
import os
import random
import threading
import time
from typing import Literal, Optional

import pytest

from fastrl.envs import FUNCTION_TAG, HERMES, ToolExecutor, ToolRegistry, tool, validate_arguments
from fastrl.envs.tools import schema_from_function

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_tools seed={SEED}")


def search(query: str, limit: int = 5, tags: Optional[list[str]] = None,
           mode: Literal["fast", "exact"] = "fast", scale: float = 1.0) -> list:
    """Search the catalogue.

    Longer explanation that is not part of the summary? It is: summaries join lines.

    Args:
        query: Text to look for.
        limit: Maximum number of hits,
            counted after filtering.
        tags (list[str]): Only hits with these tags.
        mode: Matching mode.
        scale: Score multiplier.

    Returns:
        The hits.
    """
    return []


def test_schema_from_hints_and_docstring():
    spec = schema_from_function(search)
    fn = spec["function"]
    assert spec["type"] == "function" and fn["name"] == "search"
    assert fn["description"].startswith("Search the catalogue.")
    props = fn["parameters"]["properties"]
    assert props["query"] == {"type": "string", "description": "Text to look for."}
    assert props["limit"] == {"type": "integer",
                              "description": "Maximum number of hits, counted after filtering."}
    assert props["tags"]["type"] == "array" and props["tags"]["items"] == {"type": "string"}
    assert props["mode"]["enum"] == ["fast", "exact"]
    assert props["scale"]["type"] == "number"
    assert fn["parameters"]["required"] == ["query"]
    assert "Returns" not in json.dumps(spec)


def test_schema_rejects_unexpressible_hint_naming_it():
    def f(x: "set[object]", *rest):  # noqa: F821
        pass

    with pytest.raises(TypeError, match="rest|x"):
        schema_from_function(f)


def test_registry_and_decorator():
    reg = ToolRegistry()

    @tool(name="plus")
    def p(a: int, b: int) -> int:
        """Add."""
        return a + b

    reg.register(p)
    reg.register(search)
    assert reg.names() == ["plus", "search"]
    assert reg["plus"](2, 3) == 5
    assert [s["function"]["name"] for s in reg.specs()] == ["plus", "search"]
    with pytest.raises(ValueError, match="plus"):
        reg.register(p)


def test_validate_arguments_names_bad_items():
    spec = schema_from_function(search)
    assert validate_arguments(spec, {"query": "x", "limit": 3, "tags": ["a"], "scale": 2}) == []
    errs = validate_arguments(spec, {"limit": True, "mode": "slow", "colour": 1, "tags": [1]})
    text = " | ".join(errs)
    for needle in ("missing required argument 'query'", "'limit'", "'mode'", "unknown argument 'colour'",
                   "'tags'"):
        assert needle in text, (needle, text)
    assert validate_arguments(spec, [1, 2])[0].startswith("arguments of search must be a JSON object")


def test_executor_parallel_timeout_exception_and_order():
    barrier = threading.Barrier(3, timeout=2)

    def meet(i: int) -> int:
        """Wait for the other two calls: only passes if calls run concurrently."""
        barrier.wait()
        return i * 10

    def slow(s: float) -> str:
        """Sleep."""
        time.sleep(s)
        return "late"

    def boom(x: int) -> int:
        """Fail."""
        raise RuntimeError(f"bad {x}")

    reg = ToolRegistry()
    for f in (meet, slow, boom):
        reg.register(f)
    ex = ToolExecutor(timeout_s=0.5, max_output_chars=50)
    t0 = time.monotonic()
    res = ex.run(reg, [("meet", {"i": 1}), ("slow", {"s": 1.2}), ("meet", {"i": 2}),
                       ("meet", {"i": 3}), ("boom", {"x": 7}), ("nope", {}),
                       ("meet", {"i": "x"})])
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, elapsed  # shared deadline, not 0.5 s per call
    assert [r.content for r in res[:1]] == ["10"] and res[2].content == "20" and res[3].content == "30"
    assert res[1].error == "timeout" and "timed out" in res[1].content
    assert res[4].error == "exception" and "RuntimeError: bad 7" in res[4].content
    assert res[5].error == "format" and "unknown tool 'nope'" in res[5].content
    assert res[6].error == "format" and "'i'" in res[6].content


def test_executor_sequential_keeps_order_and_truncates():
    log = []

    def step(i: int) -> str:
        """Record."""
        time.sleep(0.01 * (3 - i))
        log.append(i)
        return "x" * 100

    reg = ToolRegistry()
    reg.register(step)
    res = ToolExecutor(parallel=False, max_output_chars=20).run(reg, [("step", {"i": i}) for i in range(3)])
    assert log == [0, 1, 2]
    assert all(r.content.startswith("x" * 20 + "... [truncated 80") for r in res)


# ---------------------------------------------------------------- parsing
def _rand_args(rng):
    return {rng.choice(["a", "b", "key", "x_1"]): rng.choice([rng.randint(-999, 999), "s p", True, [1, 2]])
            for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("syntax", [HERMES, FUNCTION_TAG], ids=lambda s: s.name)
def test_render_then_parse_round_trip(syntax):
    rng = random.Random(SEED)
    for _ in range(50):
        calls = [(rng.choice(["add", "lookup", "mv_file", "x.y"]), _rand_args(rng))
                 for _ in range(rng.randint(1, 4))]
        content = rng.choice(["", "Let me compute.", "Step 1:\n"])
        text = syntax.render_turn(calls, content) + rng.choice(["", "<|im_end|>"])
        turn = syntax.parse(text)
        assert turn.format_ok, turn.all_errors
        assert [(c.name, c.arguments) for c in turn.calls] == calls
        assert turn.answer is None


def test_hermes_matches_template_rendering():
    from fastrl.models import build_tokenizer
    tok = build_tokenizer()
    calls = [("lookup", {"key": "red"}), ("add", {"a": 1, "b": -2})]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert f"<|im_start|>assistant\n{HERMES.render_turn(calls)}<|im_end|>" in text


BAD_HERMES = {
    "empty": ("", "empty turn"),
    "bad_json": ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', "invalid JSON"),
    "unclosed": ('<tool_call>\n{"name": "add", "arguments": {}}', "unclosed <tool_call>"),
    "nested_unclosed": ('<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b", "arguments": {}}</tool_call>',
                        "unclosed <tool_call>"),
    "empty_call": ("<tool_call></tool_call><|im_end|>", "empty tool call"),
    "no_name": ('<tool_call>{"arguments": {}}</tool_call>', 'no valid "name"'),
    "args_not_object": ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
    "not_object": ("<tool_call>[1]</tool_call>", "must be a JSON object"),
    "stray_close": ("</tool_call>", "stray </tool_call>"),
    "bare_json": ('{"name": "add", "arguments": {"a": 1}}', "outside call tags"),
    "foreign_syntax": ('<function=add>{"a": 1}</function>', "wrong call syntax"),
    "control_token": ('<answer>3</answer><|im_start|>user', "control token <|im_start|>"),
    "tool_response": ("<tool_response>3</tool_response>", "control token <tool_response>"),
    "unclosed_answer": ("<answer>3", "unclosed <answer>"),
    "two_answers": ("<answer>3</answer><answer>4</answer>", "2 <answer> blocks"),
    "answer_and_call": ('<tool_call>{"name": "a", "arguments": {}}</tool_call><answer>1</answer>', "not both"),
    "huge_call": ('<tool_call>{"name": "a", "arguments": {"x": "' + "z" * 5000 + '"}}</tool_call>', "too long"),
    "huge_turn": ("y" * 20000, "turn too long"),
}


@pytest.mark.parametrize("case", sorted(BAD_HERMES))
def test_hermes_malformed_turns_are_flagged_not_raised(case):
    text, needle = BAD_HERMES[case]
    turn = HERMES.parse(text)
    assert not turn.format_ok
    assert any(needle in e for e in turn.all_errors), (needle, turn.all_errors)


def test_too_many_calls_and_good_calls_survive_next_to_bad_ones():
    good = HERMES.render_call("add", {"a": 1, "b": 2})
    bad = '<tool_call>{"name": "add", "arguments": {</tool_call>'
    turn = HERMES.parse("\n".join([good, bad, good]))
    assert [c.error is None for c in turn.calls] == [True, False, True]
    turn = HERMES.parse("\n".join([good] * 10))
    assert sum(c.error is None for c in turn.calls) == 8
    assert "too many calls" in turn.calls[-1].error


def test_function_tag_syntax_errors():
    assert FUNCTION_TAG.parse("<function=add>{\"a\": 1}").errors[0].startswith("unclosed <function=add>")
    t = FUNCTION_TAG.parse("<function=add>{a: 1}</function>")
    assert "invalid JSON arguments for add" in t.call_errors[0]
    t = FUNCTION_TAG.parse("<function=a b!>{}</function>")
    assert "invalid function name" in t.call_errors[0]
    t = FUNCTION_TAG.parse('<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>')
    assert any("wrong call syntax" in e for e in t.errors)
    t = FUNCTION_TAG.parse("<function=ls></function><answer>ok</answer>")
    assert t.calls[0].arguments == {} and any("not both" in e for e in t.errors)


def test_random_garbage_never_raises():
    rng = random.Random(SEED + 7)
    atoms = ["<tool_call>", "</tool_call>", "<function=", "</function>", ">", "{", "}", '"name"', ":",
             '"arguments"', "<answer>", "</answer>", "<|im_end|>", "add", "1", ",", "\n", "[", "]", '"']
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        for syntax in (HERMES, FUNCTION_TAG):
            turn = syntax.parse(text)
            for c in turn.calls:
                assert (c.error is None) == (c.name is not None and isinstance(c.arguments, dict))
