"""The tiny in-code Llama model and tokenizer: loadable by Auto* classes, exact round trips,
control tokens atomic, chat template in the Qwen2.5 tool format, trainable."""
import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastrl.models import CONTROL_TOKENS, build_tiny_model, build_tokenizer, control_token_ids

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_models_tiny seed={SEED}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=SEED % 1000)


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _random_text(rng: random.Random, n: int) -> str:
    words = ["add", "lookup", "name", "arguments", "red", "Compute", "x", "<tool_call>",
             "</tool_call>", "<answer>", "</answer>", "<|im_end|>", "<function=add>", "{", "}",
             '"', ":", ",", "\n", " ", "  ", "\t", "-", "+", "*", "(", ")", "[", "]", "é", "→"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(words))
        elif r < 0.7:
            out.append(str(rng.randint(-10**6, 10**6)))
        else:
            out.append("".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 6))))
    return "".join(out)


def test_loads_with_auto_classes_and_config_is_standard(model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert type(tok).__name__ == "TokenizersBackend"   # tokenizer.json loaded verbatim
    assert cfg.hidden_size // cfg.num_attention_heads == 32
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 2_000_000, n_params  # small enough for CPU SFT in tests
    ids = torch.tensor([tok.encode("Compute 12 + 3", add_special_tokens=False)])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_seed_determines_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=7, num_layers=1)
    b = build_tiny_model(tmp_path / "b", seed=7, num_layers=1)
    c = build_tiny_model(tmp_path / "c", seed=8, num_layers=1)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(d).model.embed_tokens.weight for d in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    # Untied option produces a separate head.
    d = build_tiny_model(tmp_path / "d", seed=7, num_layers=1, tie_word_embeddings=False)
    m = AutoModelForCausalLM.from_pretrained(d)
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()


def test_bad_sizes_are_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(tmp_path / "x", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_model(tmp_path / "y", num_heads=4, num_kv_heads=3)


def test_control_tokens_are_atomic_and_survive_skip_special(tok):
    ids = control_token_ids(tok)
    assert set(ids) == set(CONTROL_TOKENS)
    assert len(set(ids.values())) == len(ids)
    for name, text in CONTROL_TOKENS.items():
        # Atomic even when glued to other text.
        enc = tok.encode(f"x{text}7", add_special_tokens=False)
        assert ids[name] in enc, name
    # Tool/answer tags must remain in a skip_special_tokens decode (vLLM's default).
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>'
    dec = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert dec == text.replace("<|im_end|>", "")


def test_control_token_ids_names_missing_token():
    table = {text: i for i, text in enumerate(CONTROL_TOKENS.values())}

    class Fake:  # a tokenizer that splits <answer> into pieces
        def encode(self, text, add_special_tokens=False):
            return [90, 91] if text == "<answer>" else [table[text]]

        def convert_ids_to_tokens(self, i):
            return {v: k for k, v in table.items()}[i]

    with pytest.raises(ValueError, match="answer_start"):
        control_token_ids(Fake())


def test_random_text_round_trips_and_matches_in_memory_tokenizer(tok):
    rng = random.Random(SEED)
    mem = build_tokenizer()
    for _ in range(200):
        s = _random_text(rng, rng.randint(1, 40))
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        assert ids == mem.encode(s, add_special_tokens=False)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
    # Numbers split into chunks of up to three digits, left to right, each one token.
    for _ in range(50):
        n = str(rng.randint(0, 10**12))
        pieces = tok.convert_ids_to_tokens(tok.encode(n, add_special_tokens=False))
        assert pieces == [n[i:i + 3] for i in range(0, len(n), 3)], (n, pieces)


def test_common_words_are_single_tokens(tok):
    for w in ["lookup", " lookup", "arguments", '"name', " Compute", "add"]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w


def _chat(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    key = rng.choice(["red", "apple", "owl"])
    return [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": f"Compute ({key} + {a}) * {b}."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"key": key}}},
            {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": -b}}}]},
        {"role": "tool", "name": "lookup", "content": str(a)},
        {"role": "tool", "name": "add", "content": str(a - b)},
        {"role": "assistant", "content": f"<answer>{a * b}</answer>"},
    ]


TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]


def test_chat_template_qwen_tool_format(tok):
    rng = random.Random(SEED + 1)
    msgs = _chat(rng)
    key = msgs[2]["tool_calls"][0]["function"]["arguments"]["key"]
    a, b = msgs[2]["tool_calls"][1]["function"]["arguments"].values()
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    # Tools in the system prompt, system content first.
    assert text.startswith("<|im_start|>system\nYou are careful.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in text
    assert text.count("<|im_start|>system") == 1
    # Assistant calls in Hermes form, one per tag, no leading newline before the first call.
    call1 = f'<tool_call>\n{{"name": "lookup", "arguments": {{"key": "{key}"}}}}\n</tool_call>'
    call2 = f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call1}\n{call2}<|im_end|>\n" in text
    # Consecutive tool results share one user turn.
    assert (f"<|im_start|>user\n<tool_response>\n{msgs[3]['content']}\n</tool_response>\n"
            f"<tool_response>\n{msgs[4]['content']}\n</tool_response><|im_end|>\n") in text
    assert text.endswith(f"<|im_start|>assistant\n{msgs[5]['content']}<|im_end|>\n")
    # No tools: plain ChatML; generation prompt appended.
    plain = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert plain == (f"<|im_start|>system\nYou are careful.<|im_end|>\n<|im_start|>user\n"
                     f"{msgs[1]['content']}<|im_end|>\n<|im_start|>assistant\n")
    # String arguments pass through verbatim.
    msgs[2]["tool_calls"][0]["function"]["arguments"] = '{"key": "x"}'
    assert '{"name": "lookup", "arguments": {"key": "x"}}' in tok.apply_chat_template(msgs, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tiny_model_learns_a_trajectory(model_dir, tok):
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(_chat(random.Random(SEED)), tools=TOOLS, tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
