"""policy_update: packing + one forward per micro-batch + fused loss equals an unpacked
materialising reference; non-finite gradients skip the step."""
import os

import numpy as np
import pytest
import torch
import transformers

from fastrl.data import Trajectory
from fastrl.ops import PolicyLossConfig, TokenKind
from fastrl.ops.reference import reference_policy_loss
from fastrl.trainer.update import policy_update

VOCAB = 97
CONTROL = [90, 91, 92]


def tiny_model(seed, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(cfg).float()


def random_trajectories(rng, n=5):
    trajs = []
    for i in range(n):
        expert = i == 0
        t = Trajectory(is_expert=expert, task_id=f"t{i}", group_id=i // 2)
        t.add_prompt(rng.integers(0, VOCAB, rng.integers(3, 9)))
        for turn in range(rng.integers(1, 3)):
            ids = rng.integers(0, VOCAB, rng.integers(2, 7))
            ids[-1] = CONTROL[turn % 3]
            kinds = None
            if i == 1:   # an erroneous turn: its control token gets unlikelihood
                kinds = np.full(len(ids), int(TokenKind.RL), np.int8)
                kinds[-1] = TokenKind.UNLIKELIHOOD
            t.add_assistant(ids, None if expert else rng.normal(-3, 0.5, len(ids)), kinds=kinds)
            t.add_observation(rng.integers(0, VOCAB, rng.integers(1, 4)))
        t.advantage = float(rng.normal())
        trajs.append(t)
    return trajs


def reference_grads(model, trajs, cfg):
    """Each trajectory alone through the model, full logits, float64 token-by-token loss."""
    model.zero_grad()
    rows = []
    for t in trajs:
        ids = torch.as_tensor(t.token_ids)
        hidden = model.base_model(input_ids=ids[None]).last_hidden_state[0]
        kinds = torch.as_tensor(t.kinds[1:].astype(np.int64))
        rows.append((hidden[:-1], ids[1:], kinds, torch.as_tensor(t.advantages[1:]), torch.as_tensor(t.logprobs[1:])))
    n_tokens = sum(int((r[2] != 0).sum()) for r in rows)
    total = 0
    for hidden, targets, kinds, adv, old in rows:
        total = total + reference_policy_loss(
            hidden.double(), model.get_output_embeddings().weight.double(), targets, kinds, adv, old,
            num_tokens=n_tokens, eps_low=cfg.eps_low, eps_high=cfg.eps_high, sft_weight=cfg.sft_weight,
            unlikelihood_weight=cfg.unlikelihood_weight, entropy_coef=cfg.entropy_coef)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(total.detach()), grads


class GradCapture:
    """An optimizer stand-in that records the gradients it is asked to apply."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, {}, [{"lr": 0.0}]

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("budget", [40, 4096, 8])   # 8: below the longest sequence
def test_update_matches_unpacked_reference(rng, tie, budget):
    trajs = random_trajectories(rng)
    cfg = PolicyLossConfig(entropy_coef=0.01, sft_weight=0.5, unlikelihood_weight=0.3)
    model = tiny_model(int(rng.integers(1 << 30)), tie=tie)
    ref_loss, ref_grads = reference_grads(model, trajs, cfg)
    opt = GradCapture(model)
    result = policy_update(model, trajs, optimizer=opt, loss_config=cfg, control_ids=CONTROL,
                           micro_batch_tokens=budget, grad_clip=None)
    assert not result.skipped
    assert result.loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    longest = max(len(t) for t in trajs)
    assert result.forward_passes == result.metrics["micro_batches"] >= (1 if budget > 1000 else 2)
    # A budget below the longest sequence packs around it (that sequence alone), never truncating:
    # the loss and gradients above match the reference on every token.
    assert budget >= longest or result.metrics["micro_batches"] >= 2
    for n, _ in model.named_parameters():
        scale = ref_grads[n].abs().max().item() + 1e-12
        torch.testing.assert_close(opt.grads[n] / scale, ref_grads[n].float() / scale, rtol=0, atol=2e-4)
    m = result.metrics
    assert m["tokens_sft"] == sum(int((t.kinds[1:] == TokenKind.SFT).sum()) for t in trajs) > 0
    assert m["tokens_unlikelihood"] > 0 and m["tokens_rl"] > 0


def test_non_finite_gradient_skips_the_step(rng):
    trajs = random_trajectories(rng)
    model = tiny_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    result = policy_update(model, trajs, optimizer=opt, loss_config=PolicyLossConfig(), control_ids=CONTROL,
                           micro_batch_tokens=4096)
    handle.remove()
    assert result.skipped
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in model.parameters())
    # The next healthy step moves the weights.
    result = policy_update(model, trajs, optimizer=opt, loss_config=PolicyLossConfig(), control_ids=CONTROL,
                           micro_batch_tokens=4096)
    assert not result.skipped
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_kl_needs_a_reference_model_and_counts_its_forwards(rng):
    trajs = random_trajectories(rng)
    model, ref = tiny_model(1), tiny_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="reference model"):
        policy_update(model, trajs, optimizer=opt, loss_config=PolicyLossConfig(kl_coef=0.1), control_ids=CONTROL,
                      micro_batch_tokens=4096)
    result = policy_update(model, trajs, optimizer=opt, loss_config=PolicyLossConfig(kl_coef=0.1),
                           control_ids=CONTROL, micro_batch_tokens=40, ref_model=ref)
    assert result.ref_forward_passes == result.forward_passes == result.metrics["micro_batches"] > 1
    assert result.metrics["kl_mean"] != 0.0


def test_bf16_autocast_keeps_fp32_weights_and_matches_reference(rng):
    """Mixed precision: forward under bf16 autocast, loss from bf16 hidden states and head, fp32
    gradients on the fp32 weights, within bf16 rounding of the float64 reference."""
    trajs = random_trajectories(rng)
    cfg = PolicyLossConfig(entropy_coef=0.01, sft_weight=0.5, unlikelihood_weight=0.3)
    model = tiny_model(int(rng.integers(1 << 30)), tie=False)
    ref_loss, ref_grads = reference_grads(model, trajs, cfg)
    opt = GradCapture(model)
    result = policy_update(model, trajs, optimizer=opt, loss_config=cfg, control_ids=CONTROL,
                           micro_batch_tokens=40, grad_clip=None, autocast=torch.bfloat16)
    assert not result.skipped
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.loss == pytest.approx(ref_loss, rel=3e-2)
    bf16_grads = dict(opt.grads)
    for n, _ in model.named_parameters():
        assert bf16_grads[n].dtype == torch.float32
        g, r = bf16_grads[n].double().flatten(), ref_grads[n].double().flatten()
        cos = float(g @ r / (g.norm() * r.norm() + 1e-30))
        assert cos > 0.98, (n, cos)
    # bf16 really ran: the same update in fp32 gives gradients that differ at bf16 scale.
    policy_update(model, trajs, optimizer=opt, loss_config=cfg, control_ids=CONTROL,
                  micro_batch_tokens=40, grad_clip=None)
    diff = max(float((bf16_grads[n] - opt.grads[n]).abs().max() / (opt.grads[n].abs().max() + 1e-30))
               for n, _ in model.named_parameters())
    assert diff > 1e-4, diff


def test_post_update_probe_measures_the_new_weights(rng):
    """probe=True: post_logprob_gap_mean is the mean |log p_new - log p_rollout| over RL tokens,
    with log p_new from an independent unpacked forward of the updated model."""
    trajs = random_trajectories(rng)
    model = tiny_model(int(rng.integers(1 << 30)))
    opt = torch.optim.SGD(model.parameters(), lr=float(rng.uniform(0.5, 2.0)))
    result = policy_update(model, trajs, optimizer=opt, loss_config=PolicyLossConfig(), control_ids=CONTROL,
                           micro_batch_tokens=40, grad_clip=None, probe=True)
    assert result.probe_forward_passes == result.forward_passes == result.metrics["micro_batches"]
    gaps, n_rl = [], 0
    with torch.no_grad():
        for t in trajs:
            ids = torch.as_tensor(t.token_ids)
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
            rl = torch.as_tensor(t.kinds[1:] == TokenKind.RL)
            gaps.append((logp - torch.as_tensor(t.logprobs[1:]).double()).abs()[rl])
            n_rl += int(rl.sum())
    want = float(torch.cat(gaps).mean())
    assert result.metrics["post_tokens_rl"] == n_rl
    assert result.metrics["post_logprob_gap_mean"] == pytest.approx(want, rel=1e-4)
    # The pre-update gap is the same statistic of the old weights: the update moved it.
    assert result.metrics["post_logprob_gap_mean"] != pytest.approx(result.metrics["logprob_gap_mean"], rel=1e-3)
