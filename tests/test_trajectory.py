"""Token-space trajectories: prompt + sampled ids + template observations must concatenate to
exactly the chat template's rendering of the whole conversation (tokenizer built in the test)."""
import json
import os
import random
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import Regex
from transformers import PreTrainedTokenizerFast

from fastrl.data.chat_template import (TemplateNotPrefixStableError, render_observation,
                                       render_prompt, render_turn_tail)
from fastrl.data.trajectory import Role, SequenceStore, Trajectory
from fastrl.ops.token_kind import TokenKind

# A Qwen2.5/Hermes-style ChatML template with tools: tool schemas in the system turn, calls in
# <tool_call> tags, consecutive tool results grouped into one user turn of <tool_response>s,
# every turn closed by <|im_end|> and a newline.
CHATML_TOOLS = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- set rest = messages %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as a JSON object inside <tool_call></tool_call> tags.' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for m in rest %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL = ["<|im_start|>", "<|im_end|>"]
CONTROL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
PIECES = r"\w+|[^\w\s]|\s"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a temperature",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"},
                                                        "to": {"type": "string"}},
                       "required": ["value", "to"]}}},
]
SYSTEM = "You are a weather agent."
HINT = "Hint: call get_weather first, then convert_units."
USER = "What is the weather in Paris in Fahrenheit?"
CALL_1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
RESULT_1 = '{"temp_c": 21, "sky": "sunny"}'
RESULT_1B = '{"humidity": 40}'
CALL_2 = ('<tool_call>\n{"name": "convert_units", "arguments": {"value": 21, "to": "F"}}\n'
          '</tool_call>')
RESULT_2 = '{"value": 69.8}'
ANSWER = "It is sunny in Paris, 69.8 F."


def build_tokenizer(template=CHATML_TOOLS):
    """Word-level tokenizer over every piece the test can render, plus ChatML control tokens."""
    texts = [template.replace("\\n", "\n"), json.dumps(TOOLS), SYSTEM, HINT, USER, CALL_1,
             RESULT_1, RESULT_1B, CALL_2, RESULT_2, ANSWER, "You are a helpful assistant."]
    corpus = " ".join(texts)
    pieces = sorted(set(re.findall(PIECES, corpus)) | {"\n", " "})
    vocab = {tok: i for i, tok in enumerate(["[UNK]"] + SPECIAL + CONTROL + pieces)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces keep their whitespace: decoding is exact
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", additional_special_tokens=SPECIAL)
    hf.add_tokens(CONTROL)  # like Qwen: tool tags are added (not special) tokens
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"random seed: {seed} (rerun with FASTRL_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def sample(tok, text, rng):
    """What a rollout engine returns for a turn: ids (closed by <|im_end|>) and their log-probs."""
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    return ids, -rng.uniform(0.01, 3.0, size=len(ids))


def run_episode(tok, rng, system=SYSTEM, **traj_kwargs):
    """A 3-turn tool-using episode; returns the trajectory and the message list it corresponds to."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": USER}]
    traj = Trajectory(**traj_kwargs).add_prompt(render_prompt(tok, messages, tools=TOOLS))
    turns = [(CALL_1, [RESULT_1, RESULT_1B]), (CALL_2, [RESULT_2]), (ANSWER, None)]
    for text, results in turns:
        ids, logprobs = sample(tok, text, rng)
        traj.add_assistant(ids, logprobs)
        messages.append({"role": "assistant", "content": text})
        if results is None:
            traj.add_observation(render_turn_tail(tok, messages, tools=TOOLS))
        else:
            new = [{"role": "tool", "content": r} for r in results]
            traj.add_observation(render_observation(tok, messages, new, tools=TOOLS,
                                                    assistant_ids=ids))
            messages += new
    return traj, messages


def test_concatenation_equals_full_template_rendering(tok, rng):
    traj, messages = run_episode(tok, rng)
    full = tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=False)
    assert traj.token_ids.tolist() == list(full)
    assert tok.unk_token_id not in full  # the vocabulary covers everything: a real comparison
    text = tok.decode(full, skip_special_tokens=False)
    assert text == tok.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert text.count("<tool_response>") == 3 and text.count("<|im_start|>assistant") == 3


def test_end_of_turn_is_trained_and_the_newline_after_it_is_not(tok, rng):
    traj, _ = run_episode(tok, rng, weight_version=7)
    ids, kinds = traj.token_ids, traj.kinds
    eot, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("\n")
    spans = traj.assistant_spans()
    assert len(spans) == 3
    for start, end in spans:
        assert ids[end - 1] == eot and kinds[end - 1] == TokenKind.RL
        assert (kinds[start:end] == TokenKind.RL).all()
        assert ids[end] == newline and kinds[end] == TokenKind.IGNORE
    trained = np.zeros(len(ids), bool)
    for start, end in spans:
        trained[start:end] = True
    assert (kinds[~trained] == TokenKind.IGNORE).all()  # prompt, tool results, template glue
    # Tool results are observations, never trained.
    resp = tok.convert_tokens_to_ids("<tool_response>")
    assert (kinds[ids == resp] == TokenKind.IGNORE).all() and (ids == resp).sum() == 3


def test_logprobs_and_advantages_follow_the_sampled_tokens(tok, rng):
    traj, _ = run_episode(tok, rng, advantage=0.75, reward=1.0, task_id="weather-1", group_id=3)
    kinds = traj.kinds
    lp = traj.logprobs
    sampled = np.concatenate([s.logprobs for s in traj.segments if s.role is Role.ASSISTANT])
    np.testing.assert_array_equal(lp[kinds == TokenKind.RL], sampled.astype(np.float32))
    assert (lp[kinds == TokenKind.IGNORE] == 0).all()
    adv = traj.advantages
    assert (adv[kinds == TokenKind.RL] == np.float32(0.75)).all()
    assert (adv[kinds == TokenKind.IGNORE] == 0).all()
    per_token = rng.normal(size=len(traj)).astype(np.float32)
    traj.token_advantages = per_token
    np.testing.assert_array_equal(traj.advantages, per_token)
    assert (traj.task_id, traj.group_id, traj.reward) == ("weather-1", 3, 1.0)


def test_expert_trajectory_is_sft(tok, rng):
    traj, _ = run_episode(tok, rng, is_expert=True)
    kinds = traj.kinds
    for start, end in traj.assistant_spans():
        assert (kinds[start:end] == TokenKind.SFT).all()
    assert set(np.unique(kinds).tolist()) == {TokenKind.IGNORE, TokenKind.SFT}
    # Gold turns need no rollout log-probs.
    Trajectory(is_expert=True).add_prompt([1, 2]).add_assistant([3, 4])


def test_hinted_rollout_trains_on_hint_free_prompt(tok, rng):
    hinted = render_prompt(tok, [{"role": "system", "content": SYSTEM + " " + HINT},
                                 {"role": "user", "content": USER}], tools=TOOLS)
    traj, _ = run_episode(tok, rng, hinted_prompt_ids=np.array(hinted))
    plain = render_prompt(tok, [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": USER}], tools=TOOLS)
    assert traj.prompt_ids.tolist() == plain
    assert traj.token_ids[:len(plain)].tolist() == plain
    assert len(hinted) > len(plain) and traj.hinted_prompt_ids.tolist() == hinted


def test_unlikelihood_override(tok, rng):
    ids, logprobs = sample(tok, "<tool_call>", rng)  # an empty call closed at once
    kinds = [TokenKind.UNLIKELIHOOD] * len(ids)
    traj = Trajectory(format_error=True).add_prompt([1, 2]).add_assistant(ids, logprobs, kinds)
    assert traj.kinds.tolist() == [0, 0] + [int(TokenKind.UNLIKELIHOOD)] * len(ids)
    assert traj.format_error


def test_template_that_is_not_prefix_stable_is_rejected(rng):
    # A template that states the number of turns in its system prompt re-renders turn 0.
    unstable = CHATML_TOOLS.replace("{{- '<|im_start|>system\\n' + system }}",
                                    "{{- '<|im_start|>system\\n' + system + ' ' + "
                                    "(messages | length | string) }}")
    tok = build_tokenizer(unstable)
    tok.add_tokens([str(i) for i in range(10)])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                {"role": "assistant", "content": CALL_1}]
    with pytest.raises(TemplateNotPrefixStableError, match="not prefix-stable"):
        render_observation(tok, messages, [{"role": "tool", "content": RESULT_1}])


class _GoldEnv:
    """The smallest env expert_trajectory needs: a gold conversation and no tool specs."""
    def __init__(self, messages):
        self.messages = messages

    def gold_messages(self, task, hint=False):
        return [dict(m) for m in self.messages]

    def reset(self, task, hint=False):
        return type("State", (), {"tools": None})()


GOLD = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
        {"role": "assistant", "content": CALL_1}, {"role": "tool", "content": RESULT_1},
        {"role": "assistant", "content": RESULT_1B}]


def test_expert_trajectory_cuts_each_gold_turn_out_of_one_rendering(tok):
    from fastrl.rollout.expert import expert_trajectory
    traj = expert_trajectory(_GoldEnv(GOLD), "t0", tok, score=False)
    full = tok.apply_chat_template(GOLD, tokenize=True, return_dict=False)
    assert traj.token_ids.tolist() == full
    texts = [tok.decode(traj.token_ids[a:b]) for a, b in traj.assistant_spans()]
    assert texts == [CALL_1 + "<|im_end|>", RESULT_1B + "<|im_end|>"]


def test_expert_trajectory_rejects_a_template_that_is_not_prefix_stable():
    from fastrl.rollout.expert import expert_trajectory
    unstable = CHATML_TOOLS.replace("{{- '<|im_start|>system\\n' + system }}",
                                    "{{- '<|im_start|>system\\n' + system + ' ' + "
                                    "(messages | length | string) }}")
    tok = build_tokenizer(unstable)
    tok.add_tokens([str(i) for i in range(10)])
    with pytest.raises(TemplateNotPrefixStableError, match="task t7: .*up to message 2"):
        expert_trajectory(_GoldEnv(GOLD), "t7", tok, score=False)


def test_observation_input_checks(tok, rng):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    with pytest.raises(ValueError, match="must end with the assistant turn"):
        render_observation(tok, messages, [{"role": "tool", "content": RESULT_1}])
    ids = tok.encode(CALL_1, add_special_tokens=False)  # stopped before <|im_end|>: truncated
    messages.append({"role": "assistant", "content": CALL_1})
    with pytest.raises(ValueError, match="truncated"):
        render_observation(tok, messages, [{"role": "tool", "content": RESULT_1}],
                           assistant_ids=ids)
    with pytest.raises(ValueError, match="not a token"):
        render_observation(tok, messages, [], end_of_turn="<|nope|>")


def test_trajectory_input_checks():
    traj = Trajectory().add_prompt([5, 6])
    with pytest.raises(ValueError, match="needs the rollout log-probs"):
        traj.add_assistant([1, 2])
    with pytest.raises(ValueError, match="2 tokens but 3 logprobs"):
        traj.add_assistant([1, 2], [-0.1, -0.2, -0.3])
    with pytest.raises(ValueError, match=r"kinds\[1\] = 9"):
        traj.add_assistant([1, 2], [-0.1, -0.2], [1, 9])
    with pytest.raises(ValueError, match=r"token_ids\[2\] = -4"):
        traj.add_observation([1, 2, -4])
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 2\.5"):
        traj.add_observation([1, 2.5])
    with pytest.raises(ValueError, match="empty assistant turn"):
        traj.add_assistant([], [])


def test_sequence_store_concatenates_trajectories(tok, rng):
    trajs = [run_episode(tok, rng, advantage=float(a))[0] for a in rng.normal(size=3)]
    trajs.append(Trajectory(is_expert=True).add_prompt([4, 5, 6]).add_assistant([7, 8]))
    store = SequenceStore.from_trajectories(trajs)
    assert len(store) == 4
    assert store.lengths.tolist() == [len(t) for t in trajs]
    for i, t in enumerate(trajs):
        sl = slice(store.offsets[i], store.offsets[i + 1])
        np.testing.assert_array_equal(store.token_ids[sl], t.token_ids)
        np.testing.assert_array_equal(store.kinds[sl], t.kinds)
        np.testing.assert_array_equal(store.logprobs[sl], t.logprobs)
        np.testing.assert_array_equal(store.advantages[sl], t.advantages)
    with pytest.raises(ValueError, match=r"trajectories\[1\] has no tokens"):
        SequenceStore.from_trajectories([trajs[0], Trajectory()])
