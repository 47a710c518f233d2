"""The synthetic arithmetic/lookup env: gold replay gets full reward in every split, the chat
template renders gold trajectories that tokenize exactly, splits are disjoint and shifted as
documented, and malformed turns give error observations and format flags without raising."""
import os
import random
import re

import pytest

from fastrl.envs import (HERMES, SPLITS, SYNTAXES, RewardWeights, SyntheticConfig,
                         SyntheticEnv, make_tasks)
from fastrl.models import build_tokenizer

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_envs_synthetic seed={SEED}")


def assistant_text(msg, syntax):
    """What a model would generate for a gold assistant message."""
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]
    return syntax.render_turn(calls, msg.get("content") or "") if calls else msg["content"]


def replay(env, task, hint=False):
    state = env.reset(task, hint=hint)
    gold = task.gold_messages
    i = 0
    while i < len(gold):
        msg = gold[i]
        assert msg["role"] == "assistant"
        obs, done, info = env.step(state, assistant_text(msg, SYNTAXES[task.syntax]) + "<|im_end|>")
        assert info["format_ok"], info
        j = i + 1
        while j < len(gold) and gold[j]["role"] == "tool":
            j += 1
        if done:
            assert obs is None and j == len(gold)
        else:
            assert obs == gold[i + 1: j]
        i = j
    assert state.done
    return state


@pytest.mark.parametrize("split", SPLITS)
def test_gold_replay_gets_full_reward(split):
    weights = RewardWeights(format=0.3, correct=2.0)
    env = SyntheticEnv(SyntheticConfig(weights=weights))
    for task in make_tasks(split, 12, seed=SEED % 10_000):
        state = replay(env, task)
        r = env.reward(state)
        assert r["correct"] == 1.0 and r["format"] == 1.0
        assert r["total"] == pytest.approx(2.3)
        assert sum(r["per_turn"]) == pytest.approx(r["total"])
        assert len(r["per_turn"]) == len(state.turns)
        n_calls = sum(t.num_calls for t in state.turns)
        assert n_calls == task.difficulty


@pytest.mark.parametrize("split", SPLITS)
def test_gold_renders_and_tokenizes_exactly(split):
    tok = build_tokenizer()
    env = SyntheticEnv()
    for task in make_tasks(split, 8, seed=SEED % 10_000 + 1):
        hint = random.Random(SEED).random() < 0.5
        msgs = env.gold_messages(task, hint=hint)
        text = tok.apply_chat_template(msgs, tools=env.tools(task), tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        # Each assistant segment of the rendering is exactly what the env parses as the gold turn.
        segments = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, flags=re.S)
        expected = [assistant_text(m, SYNTAXES[task.syntax]) for m in msgs if m["role"] == "assistant"]
        assert segments == expected
        assert (task.hint in text) == hint
        if task.syntax == "function_tag":
            assert "<tool_call>" not in text and "<function=" in text
            assert env.tools(task) is None
        else:
            assert "<function=" not in text


def test_splits_disjoint_deterministic_and_shifted():
    seed = SEED % 1000
    train = make_tasks("train", 300, seed=seed)
    test = make_tasks("test", 100, seed=seed + 1)
    sig = lambda t: (t.question, tuple(t.store.items()))  # noqa: E731
    assert not {sig(t) for t in train} & {sig(t) for t in test}
    assert [sig(t) for t in make_tasks("train", 20, seed=seed)] == [sig(t) for t in train[:20]]
    assert [sig(t) for t in make_tasks("train", 20, seed=seed + 5)] != [sig(t) for t in train[:20]]
    assert {t.difficulty for t in train} == {1, 2, 3, 4}
    for t in train + test:
        assert all(1 <= v <= 50 for v in t.store.values())
    shifted = make_tasks("content_shift", 50, seed=seed)
    assert {t.difficulty for t in shifted} <= {5, 6}
    for t in shifted:
        assert all(100 <= v <= 999 for v in t.store.values())
        nums = [int(x) for x in re.findall(r"(?<![\dr])\d+", t.question)]   # not the keys' r12
        assert nums and all(100 <= x <= 999 for x in nums)
    fmt = make_tasks("format_shift", 30, seed=seed)
    assert all(t.syntax == "function_tag" for t in fmt)
    for d in (1, 3):
        assert all(t.difficulty == d for t in make_tasks("train", 10, seed=seed, difficulty=d))
    with pytest.raises(ValueError, match="split"):
        make_tasks("validation", 1)
    with pytest.raises(ValueError, match="difficulty"):
        make_tasks("train", 1, difficulty=0)


def test_gold_answers_are_right_arithmetic():
    # Independent check of the gold answer: parse the question's steps and apply them ourselves.
    apply = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply by": lambda a, b: a * b}
    for task in make_tasks("train", 40, seed=SEED % 997) + make_tasks("content_shift", 10, seed=SEED % 991):
        value = lambda x: task.store[x.strip('"')] if x.startswith('"') else int(x)  # noqa: E731
        if task.question.startswith("What is"):
            assert task.answer == task.store[task.keys[0]]
            continue
        first, *steps = task.question.removeprefix("Start with ").rstrip(".").split(", ")
        acc = value(first)
        for step in steps:
            verb, x = re.fullmatch(r"(add|subtract|multiply by) (\S+)", step).groups()
            acc = apply[verb](acc, value(x))
        assert steps and acc == task.answer, (task.question, task.store)


def test_malformed_turns_give_error_observations_and_flags():
    env = SyntheticEnv(SyntheticConfig(max_turns=7))
    task = make_tasks("train", 1, seed=SEED % 1000, difficulty=3)[0]
    state = env.reset(task)
    bad_turns = [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": }}\n</tool_call>',   # bad JSON
        '<tool_call>\n{"name": "pow", "arguments": {"a": 1}}\n</tool_call>',        # unknown tool
        '<tool_call>\n{"name": "add", "arguments": {"a": "1"}}\n</tool_call>',       # wrong/missing args
        "<tool_call>\n{\"name\": \"add\"",                                          # unclosed
        "I think the answer is 5.",                                                  # neither
    ]
    for text in bad_turns:
        obs, done, info = env.step(state, text)
        assert not done and not info["format_ok"] and info["format_errors"]
        assert obs and all(m["role"] == "tool" for m in obs)
        assert any("rror" in m["content"] for m in obs)
    # A runtime tool error is not a format error.
    obs, done, info = env.step(state, HERMES.render_call("lookup", {"key": "not_a_key"}))
    assert info["format_ok"] and info["tool_errors"] and "no key 'not_a_key'" in obs[0]["content"]
    assert not done
    # Max turns reached: done without an answer.
    obs, done, info = env.step(state, HERMES.render_call("add", {"a": 1, "b": 2}))
    assert done and obs is None
    r = env.reward(state)
    assert r["correct"] == 0.0 and r["format"] == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match=task.id):
        env.step(state, "<answer>1</answer>")


def test_wrong_answer_and_wrong_syntax():
    env = SyntheticEnv()
    task = make_tasks("test", 1, seed=SEED % 1000)[0]
    state = env.reset(task)
    obs, done, info = env.step(state, f"<answer>{task.answer + 1}</answer>")
    assert done and info["format_ok"]
    r = env.reward(state)
    assert r["correct"] == 0.0 and r["format"] == 1.0 and r["total"] == pytest.approx(0.2)
    # Hermes calls in the format-shift split are a format error there; function tags work.
    task = make_tasks("format_shift", 1, seed=SEED % 1000, difficulty=1)[0]
    state = env.reset(task)
    name, args = task.gold_messages[0]["content"][len("<function="):].split(">", 1)
    obs, done, info = env.step(state, HERMES.render_call(name, eval_free_json(args)))
    assert not info["format_ok"] and any("wrong call syntax" in e for e in info["format_errors"])
    obs, done, info = env.step(state, task.gold_messages[0]["content"])
    assert info["format_ok"] and obs == [task.gold_messages[1]]


def eval_free_json(text):
    import json
    return json.loads(text[: text.rindex("</function>")])


def test_hint_only_when_asked():
    env = SyntheticEnv()
    task = make_tasks("train", 1, seed=SEED % 1000)[0]
    assert task.hint and task.hint not in env.reset(task).messages[0]["content"]
    state = env.reset(task, hint=True)
    assert task.hint in state.messages[0]["content"] and state.hint == task.hint
    assert env.reset(task).prompt_messages[1]["content"] == task.question
