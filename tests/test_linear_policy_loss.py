"""linear_policy_loss against the float64 token-by-token reference, both backends."""
import dataclasses

import pytest
import torch

from fastrl.ops import PolicyLossConfig, TokenKind, linear_policy_loss
from fastrl.ops.reference import reference_policy_loss, reference_token_stats

BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: Triton runs in the interpreter


def make_batch(gen, n=48, h=20, v=531, num_seqs=5):
    x = torch.randn(n, h, generator=gen)
    w = torch.randn(v, h, generator=gen) * 0.5
    y = torch.randint(0, v, (n,), generator=gen)
    control = [v - 1, v - 3, 7]
    y[torch.randperm(n, generator=gen)[:6]] = torch.tensor(control * 2)   # some control targets
    kinds = torch.randint(0, 4, (n,), generator=gen)
    kinds[:12] = TokenKind.RL                       # make sure every kind appears
    kinds[12:16] = torch.tensor([0, 1, 2, 3])
    y[kinds == TokenKind.IGNORE] = -100
    seq_ids = torch.sort(torch.randint(0, num_seqs, (n,), generator=gen)).values
    adv = torch.randn(n, generator=gen)
    with torch.no_grad():
        logp = reference_token_stats(x.double(), w.double(), y, control)[0].float()
    old = logp + 0.4 * torch.randn(n, generator=gen)   # ratios both inside and outside the clip range
    ref = logp + 0.3 * torch.randn(n, generator=gen)
    batch = dict(x=x, w=w, y=y, kinds=kinds, adv=adv, old=old, ref=ref, seq_ids=seq_ids)
    return {k: t.to(DEVICE) for k, t in batch.items()} | {"control": control}


CONFIGS = {
    "token_mean": PolicyLossConfig(),
    "clip_higher_dual_kl_k3_entropy": PolicyLossConfig(eps_high=0.28, dual_clip=2.0, kl_coef=0.3,
                                                       kl_estimator="k3", entropy_coef=0.05,
                                                       sft_weight=0.5, unlikelihood_weight=2.0),
    "kl_k1_temperature": PolicyLossConfig(kl_coef=0.2, kl_estimator="k1", temperature=0.7),
    "seq_mean": PolicyLossConfig(aggregation="seq_mean", entropy_coef=0.01),
    "constant": PolicyLossConfig(aggregation="constant", loss_constant=64.0, kl_coef=0.1),
}


def reference_kwargs(cfg):
    return {f: getattr(cfg, f) for f in ("eps_low", "eps_high", "dual_clip", "kl_coef", "kl_estimator",
                                           "entropy_coef", "sft_weight", "unlikelihood_weight",
                                           "aggregation", "loss_constant", "temperature")}


def run(b, cfg, backend, rows=None, **kw):
    rows = slice(None) if rows is None else rows
    xx, ww = b["x"][rows].clone().requires_grad_(), b["w"].clone().requires_grad_()
    out = linear_policy_loss(xx, ww, b["y"][rows], kinds=b["kinds"][rows], advantages=b["adv"][rows],
                             old_logprobs=b["old"][rows], ref_logprobs=b["ref"][rows],
                             control_ids=b["control"], config=cfg, seq_ids=b["seq_ids"][rows],
                             backend=backend, **kw)
    out.loss.backward()
    return out, xx.grad, ww.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_reference(backend, name, gen):
    b = make_batch(gen)
    cfg = dataclasses.replace(CONFIGS[name], workspace_bytes=531 * 8 * 7)   # several chunks
    xr, wr = b["x"].double().requires_grad_(), b["w"].double().requires_grad_()
    ref = reference_policy_loss(xr, wr, b["y"], b["kinds"], b["adv"], b["old"], b["ref"], b["seq_ids"],
                                **reference_kwargs(cfg))
    ref.backward()
    out, gx, gw = run(b, cfg, backend)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), xr.grad, rtol=1e-4, atol=1e-5 * xr.grad.abs().max().item())
    torch.testing.assert_close(gw.double(), wr.grad, rtol=1e-4, atol=1e-5 * wr.grad.abs().max().item())
    assert (gx[b["kinds"] == TokenKind.IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_rows_mix_with_off_policy_rows(backend, gen):
    b = make_batch(gen)
    onp = (torch.rand(48, generator=gen) < 0.4).to(DEVICE)
    b["old"][onp] = float("nan")       # on-policy rows need no behaviour log-probs
    cfg = PolicyLossConfig(eps_high=0.28, kl_coef=0.1)
    xr, wr = b["x"].double().requires_grad_(), b["w"].double().requires_grad_()
    ref = reference_policy_loss(xr, wr, b["y"], b["kinds"], b["adv"], b["old"], b["ref"], on_policy_rows=onp,
                                **reference_kwargs(cfg))
    ref.backward()
    out, gx, gw = run(b, cfg, backend, on_policy_rows=onp)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), xr.grad, rtol=1e-4, atol=1e-5 * xr.grad.abs().max().item())
    assert torch.isfinite(out.metrics["logprob_gap_mean"])
    with pytest.raises(ValueError, match="old_logprobs"):
        run(b, cfg, backend)             # the NaNs are an error where rows are off-policy


@pytest.mark.parametrize("backend", BACKENDS)
def test_rl_data_at_other_kinds_never_reaches_loss_or_gradients(backend, gen):
    """Every kind's term is computed on every row and picked with torch.where, so non-finite
    advantages / old / ref log-probs at SFT and unlikelihood rows must not leak (0 * inf = NaN)."""
    b = make_batch(gen)
    cfg = CONFIGS["clip_higher_dual_kl_k3_entropy"]
    xr, wr = b["x"].double().requires_grad_(), b["w"].double().requires_grad_()
    ref = reference_policy_loss(xr, wr, b["y"], b["kinds"], b["adv"], b["old"], b["ref"],
                                **reference_kwargs(cfg))
    ref.backward()
    not_rl = b["kinds"] != TokenKind.RL
    for key, bad in (("adv", float("inf")), ("old", float("nan")), ("ref", -float("inf"))):
        b[key] = torch.where(not_rl, bad, b[key])
    out, gx, gw = run(b, cfg, backend)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), xr.grad, rtol=1e-4, atol=1e-5 * xr.grad.abs().max().item())
    torch.testing.assert_close(gw.double(), wr.grad, rtol=1e-4, atol=1e-5 * wr.grad.abs().max().item())
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_ratio_is_one_and_detached(backend, gen):
    b = make_batch(gen)
    b["kinds"][:] = TokenKind.RL
    b["y"] = torch.randint(0, 531, (48,), generator=gen).to(DEVICE)
    xr, wr = b["x"].double().requires_grad_(), b["w"].double().requires_grad_()
    ref = reference_policy_loss(xr, wr, b["y"], b["kinds"], b["adv"])   # old = logp.detach()
    ref.backward()
    xx = b["x"].clone().requires_grad_()
    out = linear_policy_loss(xx, b["w"], b["y"], kinds=b["kinds"], advantages=b["adv"],
                             control_ids=b["control"], backend=backend)
    out.loss.backward()
    # ratio == 1: loss = -mean(A), gradient = -A * dlogp / n
    torch.testing.assert_close(out.loss.double(), -b["adv"].double().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    assert float(out.metrics["clip_fraction"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batches_with_global_counts_add_up_to_whole_batch(backend, aggregation, gen):
    b = make_batch(gen)
    cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=0.1, entropy_coef=0.02)
    whole, gx, gw = run(b, cfg, backend)
    # Split on a sequence boundary, as packing does.
    cut = int((b["seq_ids"] < int(b["seq_ids"].median())).sum())
    active = b["kinds"] != TokenKind.IGNORE
    counts = dict(num_tokens=int(active.sum()),
                  num_sequences=int(torch.unique(b["seq_ids"][active]).numel()))
    part1, gx1, gw1 = run(b, cfg, backend, rows=slice(0, cut), **counts)
    part2, gx2, gw2 = run(b, cfg, backend, rows=slice(cut, None), **counts)
    torch.testing.assert_close(part1.loss + part2.loss, whole.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([gx1, gx2]), gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw1 + gw2, gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_match_reference_statistics(backend, gen):
    b = make_batch(gen)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k1", spike_threshold=0.05)
    w = b["w"].clone()
    w[b["control"][0]] *= 4.0            # make spikes likely on one control token
    b["w"] = w
    out, _, _ = run(b, cfg, backend)
    logp, ent, ctrl, _ = reference_token_stats(b["x"].double(), w.double(), b["y"], b["control"])
    rl = b["kinds"] == TokenKind.RL
    is_ctrl = torch.isin(b["y"], torch.tensor(b["control"], device=DEVICE))
    plain, at_ctrl = rl & ~is_ctrl, rl & is_ctrl
    p_ctrl = ctrl.exp().sum(1)
    ratio = torch.exp(logp - b["old"].double())
    adv = b["adv"].double()
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.2) & (adv > 0))
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["tokens_rl"] == int(rl.sum())
    assert m["tokens_sft"] == int((b["kinds"] == TokenKind.SFT).sum())
    assert m["tokens_unlikelihood"] == int((b["kinds"] == TokenKind.UNLIKELIHOOD).sum())
    assert m["tokens_rl_control_target"] == int(at_ctrl.sum()) > 0
    assert m["clip_fraction"] == pytest.approx(float(clipped[rl].double().mean()), abs=1e-6)
    assert m["kl_mean"] == pytest.approx(float((logp - b["ref"].double())[rl].mean()), rel=1e-4, abs=1e-5)
    assert m["intrusion_mean"] == pytest.approx(float(p_ctrl[plain].mean()), rel=1e-4, abs=1e-7)
    assert m["intrusion_max"] == pytest.approx(float(p_ctrl[plain].max()), rel=1e-4, abs=1e-7)
    assert m["control_confidence_mean"] == pytest.approx(float(logp[at_ctrl].mean()), rel=1e-4, abs=1e-5)
    assert m["control_confidence_min"] == pytest.approx(float(logp[at_ctrl].min()), rel=1e-4, abs=1e-5)
    assert m["spike_count"] == int((plain & (ctrl.exp().max(1).values > 0.05)).sum())
    assert m["entropy_rl_mean"] == pytest.approx(float(ent[rl].mean()), rel=1e-4)
    assert m["logprob_gap_mean"] == pytest.approx(float((logp - b["old"].double()).abs()[rl].mean()), rel=1e-4)
    torch.testing.assert_close(out.logprobs.double(), logp, rtol=1e-5, atol=1e-5)

    # No RL row targets a control token: the control-target statistics are 0, not inf or NaN.
    b["kinds"] = torch.where(rl & is_ctrl, TokenKind.SFT, b["kinds"])
    m = {k: float(v) for k, v in run(b, cfg, backend)[0].metrics.items()}
    assert m["tokens_rl_control_target"] == 0
    assert m["control_confidence_min"] == 0.0 and m["control_confidence_mean"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend, gen):
    b = make_batch(gen)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, workspace_bytes=531 * 8 * 9)
    first, second = run(b, cfg, backend), run(b, cfg, backend)
    assert torch.equal(first[0].loss, second[0].loss)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_bad_inputs_name_the_problem(gen):
    b = make_batch(gen)
    base = dict(kinds=b["kinds"], advantages=b["adv"], control_ids=b["control"])
    x, w, y = b["x"], b["w"], b["y"]
    bad_kinds = b["kinds"].clone()
    bad_kinds[3] = 7
    with pytest.raises(ValueError, match=r"kinds\[3\] = 7"):
        linear_policy_loss(x, w, y, **{**base, "kinds": bad_kinds})
    with pytest.raises(ValueError, match="advantages is required"):
        linear_policy_loss(x, w, y, **{**base, "advantages": None})
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        linear_policy_loss(x, w, y, **base, config=PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="control_ids is empty"):
        linear_policy_loss(x, w, y, **{**base, "control_ids": []})
    with pytest.raises(ValueError, match="seq_ids"):
        linear_policy_loss(x, w, y, **base, config=PolicyLossConfig(aggregation="seq_mean"))
    with pytest.raises(ValueError, match="loss_constant"):
        linear_policy_loss(x, w, y, **base, config=PolicyLossConfig(aggregation="constant"))
    with pytest.raises(ValueError, match="temperature"):
        linear_policy_loss(x, w, y, **base, config=PolicyLossConfig(temperature=float("nan")))
    adv = b["adv"].clone()
    rl_row = int((b["kinds"] == TokenKind.RL).nonzero()[0, 0])
    adv[rl_row] = float("nan")
    with pytest.raises(ValueError, match=rf"advantages\[{rl_row}\] = nan"):
        linear_policy_loss(x, w, y, **{**base, "advantages": adv})
    bad_y = y.clone()
    bad_y[rl_row] = 10_000
    with pytest.raises(ValueError, match=rf"targets\[{rl_row}\] = 10000"):
        linear_policy_loss(x, w, bad_y, **base)
    with pytest.raises(ValueError, match="advantages must be a tensor of shape"):
        linear_policy_loss(x, w, y, **{**base, "advantages": b["adv"][:5]})
    with pytest.raises(ValueError, match="num_tokens"):
        linear_policy_loss(x, w, y, **base, num_tokens=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weight_grad_in_its_own_dtype_when_fp32_copy_exceeds_workspace(backend, gen):
    """A bf16 head whose fp32 dW copy would not fit half the workspace accumulates dW in bf16
    (fp32 inside each chunk's product): still within bf16 rounding of the float64 gradient."""
    from fastrl.ops.linear_token_stats import weight_grad_buffer

    b = make_batch(gen, n=96, h=32, v=1531)
    small = 1531 * 6 * 10                        # ~10 rows per chunk, far below the fp32 copy (196 kB)
    wb = b["w"].to(torch.bfloat16)
    assert weight_grad_buffer(wb, small).dtype == torch.bfloat16
    assert weight_grad_buffer(wb, 1 << 30).dtype == torch.float32
    assert weight_grad_buffer(b["w"], small).dtype == torch.float32   # an fp32 head is its own buffer

    cfg = PolicyLossConfig(control_metrics=False, workspace_bytes=small)
    xx = b["x"].to(torch.bfloat16).requires_grad_()
    ww = wb.clone().requires_grad_()
    out = linear_policy_loss(xx, ww, b["y"], kinds=b["kinds"], advantages=b["adv"], old_logprobs=b["old"],
                             config=cfg, backend=backend)
    out.loss.backward()
    xr, wr = xx.detach().double().requires_grad_(), wb.double().requires_grad_()
    ref = reference_policy_loss(xr, wr, b["y"], b["kinds"], b["adv"], b["old"])
    ref.backward()
    assert ww.grad.dtype == torch.bfloat16
    err = float((ww.grad.double() - wr.grad).abs().max() / wr.grad.abs().max())
    assert err < 2e-2, err


def test_second_backward_through_the_same_loss_is_an_error(gen):
    b = make_batch(gen)
    x = b["x"].clone().requires_grad_()
    out = linear_policy_loss(x, b["w"], b["y"], kinds=b["kinds"], advantages=b["adv"],
                             config=PolicyLossConfig(control_metrics=False), backend="torch")
    (2 * out.loss).backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()
    torch.testing.assert_close(x.grad, first)
    # The upstream gradient (2) scales the gradient formed in the forward.
    x1 = b["x"].clone().requires_grad_()
    linear_policy_loss(x1, b["w"], b["y"], kinds=b["kinds"], advantages=b["adv"],
                       config=PolicyLossConfig(control_metrics=False), backend="torch").loss.backward()
    torch.testing.assert_close(first, 2 * x1.grad)
