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


def test_varlen_path_passes_sequence_boundaries_to_the_kernel(rng, monkeypatch):
    # flash-attn is not installed on CPU machines; this registers a PyTorch stand-in for its varlen
    # kernel under transformers' "flash_attention_2" name, so packed_forward's flash path runs
    # through transformers up to the kernel call. The stand-in attends within the sequences it is
    # told about (cu_seq_lens_q) and over the whole row when told none, like flash-attn.
    from transformers.modeling_utils import AttentionInterface

    calls = []

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        calls.append(kwargs)
        cu = kwargs.get("cu_seq_lens_q")
        bounds = cu.tolist() if cu is not None else [0, query.shape[2]]
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
            for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
        return out.transpose(1, 2), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", varlen_attention)
    model = tiny_qwen2("sdpa")
    store, batch = random_batch(rng, n=6)
    t = batch.to_torch()
    with torch.no_grad():
        unpacked = []                                  # the reference: sdpa, one sequence at a time
        for s in batch.sequences.tolist():
            ids = torch.from_numpy(store.token_ids[store.offsets[s]:store.offsets[s + 1]])
            unpacked.append(target_logprobs(model(ids[None]).logits[0],
                                            torch.cat([ids[1:], ids[:1] * 0])))
        model.config._attn_implementation = "flash_attention_2"
        out = packed_forward(model, t["input_ids"], t["position_ids"], t["cu_seqlens"],
                             return_logits=True, layout="padded")   # layout is ignored by varlen
        leaky = model(t["input_ids"][None], position_ids=t["position_ids"][None]).logits[0]
    packed_calls, plain_calls = calls[:2], calls[2:]
    assert len(packed_calls) == len(plain_calls) == 2    # one per layer
    for kwargs in packed_calls:
        assert torch.equal(kwargs["cu_seq_lens_q"].long(), t["cu_seqlens"].long())
        assert torch.equal(kwargs["cu_seq_lens_k"].long(), t["cu_seqlens"].long())
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == batch.max_seqlen
    torch.testing.assert_close(target_logprobs(out.logits, t["target_ids"]), torch.cat(unpacked),
                               atol=1e-5, rtol=0)
    # Without the boundaries the same kernel lets later sequences attend earlier ones.
    assert all("cu_seq_lens_q" not in kwargs for kwargs in plain_calls)
    first = int(t["cu_seqlens"][1])
    assert (out.logits[first:] - leaky[first:]).abs().max() > 1e-3
