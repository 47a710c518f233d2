"""A packed forward must equal unpacked forwards of the same sequences: no attention across
sequence boundaries, positions restarting per sequence. Tiny random Qwen2 built in the test."""
import os
import random

import numpy as np
import pytest
import torch
import transformers

from fastrl.data.packed import build_packed_batch
from fastrl.data.packed_forward import block_causal_mask, packed_forward
from fastrl.data.trajectory import SequenceStore, Trajectory

VOCAB = 300


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"random seed: {seed} (rerun with FASTRL_TEST_SEED={seed})")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def tiny_qwen2(attn):
    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      vocab_size=VOCAB, attn_implementation=attn)
    return transformers.Qwen2ForCausalLM(config).float().eval()


def random_batch(rng, n=5):
    trajs = []
    for _ in range(n):
        prompt = rng.integers(0, VOCAB, size=int(rng.integers(2, 30)))
        k = int(rng.integers(1, 30))
        trajs.append(Trajectory().add_prompt(prompt).add_assistant(
            rng.integers(0, VOCAB, size=k), -rng.uniform(0.1, 3, size=k)))
    store = SequenceStore.from_trajectories(trajs)
    return store, build_packed_batch(store, rng.permutation(n), VOCAB)


def target_logprobs(logits, targets):
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("layout", ["padded", "block_mask", "auto"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_unpacked(rng, attn, layout):
    model = tiny_qwen2(attn)
    store, batch = random_batch(rng)
    t = batch.to_torch()
    with torch.no_grad():
        out = packed_forward(model, t["input_ids"], t["position_ids"], t["cu_seqlens"],
                             return_logits=True, layout=layout)
        packed = target_logprobs(out.logits, t["target_ids"])
        unpacked = []
        for s in batch.sequences.tolist():
            ids = torch.from_numpy(store.token_ids[store.offsets[s]:store.offsets[s + 1]])
            logits = model(ids[None]).logits[0]
            unpacked.append(target_logprobs(logits, torch.cat([ids[1:], ids[:1] * 0])))
        unpacked = torch.cat(unpacked)
    has_target = t["kinds"] != 0
    assert has_target.sum() > 0
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=0)
    # Hidden states are the LM head's input: the head applied to them gives the logits.
    torch.testing.assert_close(model.lm_head(out.hidden_states), out.logits)
    assert out.hidden_states.shape == (batch.num_tokens, 64)


def test_padded_layout_gradients_equal_block_mask(rng):
    # The layouts differ only in how attention is laid out: same loss, same parameter gradients.
    model = tiny_qwen2("sdpa").train()
    _, batch = random_batch(rng, n=7)
    t = batch.to_torch()
    weights = torch.randn(batch.num_tokens, 64, dtype=torch.float64)
    grads = {}
    for layout in ("padded", "block_mask"):
        model.zero_grad()
        hidden = packed_forward(model, t["input_ids"], t["position_ids"], t["cu_seqlens"],
                                layout=layout).hidden_states
        (hidden.double() * weights).sum().backward()
        grads[layout] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads["padded"]) == len(grads["block_mask"]) > 0
    for a, b in zip(grads["padded"], grads["block_mask"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bad_layout_is_an_error():
    with pytest.raises(ValueError, match="layout"):
        packed_forward(tiny_qwen2("sdpa"), torch.arange(4), torch.arange(4), torch.tensor([0, 4]),
                       layout="ragged")


def test_without_the_block_mask_sequences_leak(rng):
    # The check above can fail: a plain causal forward over the packed row differs.
    model = tiny_qwen2("sdpa")
    _, batch = random_batch(rng)
    t = batch.to_torch()
    with torch.no_grad():
        good = packed_forward(model, t["input_ids"], t["position_ids"], t["cu_seqlens"],
                              return_logits=True).logits
        leaky = model(t["input_ids"][None], position_ids=t["position_ids"][None]).logits[0]
    first = slice(0, int(t["cu_seqlens"][1]))
    torch.testing.assert_close(good[first], leaky[first], atol=1e-5, rtol=0)
    assert (good[first.stop:] - leaky[first.stop:]).abs().max() > 1e-3


def test_block_causal_mask():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    allowed = block_causal_mask(cu)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    additive = block_causal_mask(cu, dtype=torch.float32)[0, 0]
    assert (additive[expected] == 0).all() and (additive[~expected] < -1e30).all()


def test_mismatched_lengths_rejected(rng):
    model = tiny_qwen2("sdpa")
    with pytest.raises(ValueError, match="cu_seqlens ends at 4 but there are 5 tokens"):
        packed_forward(model, torch.arange(5), torch.arange(5), torch.tensor([0, 4]))
