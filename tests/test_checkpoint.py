"""Checkpoints: bitwise round trip (tied and untied Qwen2), optimizer/scheduler/RNG restore,
pruning, crash safety (exception mid-save, leftover temp dirs, SIGKILL) and HF export."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import fastrl.trainer.checkpoint as ckpt_mod
from fastrl.trainer.checkpoint import (checkpoint_step, export_pretrained, latest_checkpoint,
                                       list_checkpoints, load_checkpoint, save_checkpoint)


def tiny_qwen(tied: bool, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, vocab_size=100,
                      tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg)


def make_opt(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def train_step(model, opt, sched, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def draw_randoms():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.randint(0, 1000, (4,)).tolist())


def is_tied(model):
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bitwise(tmp_path, tied):
    seed = random.randrange(10**6)
    model = tiny_qwen(tied, seed)
    assert is_tied(model) == tied
    opt, sched = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 100, (2, 12), generator=gen) for _ in range(3)]
    for b in batches[:2]:
        train_step(model, opt, sched, b)

    extra = {"step": 2, "task_cursor": seed % 97, "monitor": {"ema": 0.25}, "config": {"lr": 1e-3}}
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched,
                           extra_state=extra, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step_00000002" and latest_checkpoint(tmp_path) == path
    assert checkpoint_step(path) == 2
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # tied embeddings are stored once
    assert ("lm_head.weight" in keys and "model.embed_tokens.weight" in keys) == (not tied)

    expected_randoms = draw_randoms()   # the streams right after the save
    reference = copy.deepcopy((model, opt, sched))

    # Diverge: more training, more random draws; then restore into a *fresh* model/optimizer.
    train_step(model, opt, sched, batches[2])
    draw_randoms()
    model2 = tiny_qwen(tied, seed + 1)
    opt2, sched2 = make_opt(model2)
    got_extra = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert got_extra == extra
    assert draw_randoms() == expected_randoms

    ref_model, ref_opt, ref_sched = reference
    assert is_tied(model2) == tied
    for (n, p), (n2, p2) in zip(ref_model.named_parameters(), model2.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    ref_state, state2 = ref_opt.state_dict()["state"], opt2.state_dict()["state"]
    assert ref_state.keys() == state2.keys() and len(state2) > 0
    for k in ref_state:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[k][name], state2[k][name]), (k, name)
    assert sched2.state_dict() == ref_sched.state_dict()
    assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]

    # The strongest check: one more step from both gives bitwise identical weights.
    train_step(ref_model, ref_opt, ref_sched, batches[2])
    train_step(model2, opt2, sched2, batches[2])
    for (n, p), p2 in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n


def test_non_json_extra_state_and_wrong_model(tmp_path):
    model = tiny_qwen(True, 0)
    extra = {"pos": (3, 4), 5: "int key", "t": torch.arange(4), "loss": float("nan")}
    path = save_checkpoint(tmp_path, 7, model=model, optimizer=None, extra_state=extra,
                           keep_last=1)
    assert (path / "extra_state.pt").is_file() and not (path / "extra_state.json").exists()
    got = load_checkpoint(path, model=tiny_qwen(True, 1), restore_rng=False)
    assert got["pos"] == (3, 4) and got[5] == "int key" and torch.equal(got["t"], torch.arange(4))
    assert np.isnan(got["loss"])
    with pytest.raises(ValueError, match=r"does not match the model: missing \['(model\.embed_tokens|lm_head)\.weight'\]"):
        load_checkpoint(path, model=tiny_qwen(False, 1))   # untied model, tied checkpoint
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_checkpoint(path, model=model, optimizer=make_opt(model)[0])
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints", model=model)


def test_keep_spares_the_rollback_target_from_pruning(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = sorted(random.sample(range(1, 1000), 6))
    target = save_checkpoint(tmp_path, steps[0], model=model, optimizer=opt, extra_state={}, keep_last=2)
    for s in steps[1:]:
        save_checkpoint(tmp_path, s, model=model, optimizer=opt, extra_state={}, keep_last=2, keep=target)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [steps[0]] + steps[-2:]


def test_keep_last_prunes_and_resave(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = sorted(random.sample(range(1, 1000), 5))
    for s in steps:
        save_checkpoint(tmp_path, s, model=model, optimizer=opt, extra_state={"s": s}, keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == steps[-2:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"step_{s:08d}" for s in steps[-2:]]
    # re-saving an existing step replaces it; the one just written is never pruned even if an
    # older timeline left higher steps behind
    with torch.no_grad():
        model.weight.fill_(3.0)
    p = save_checkpoint(tmp_path, steps[0], model=model, optimizer=opt, extra_state={}, keep_last=1)
    assert list_checkpoints(tmp_path) == [p]
    save_checkpoint(tmp_path, steps[0], model=model, optimizer=opt, extra_state={"again": 1},
                    keep_last=None)
    m2 = torch.nn.Linear(4, 4)
    assert load_checkpoint(p, model=m2) == {"again": 1} and torch.all(m2.weight == 3.0)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra_state={}, keep_last=0)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    good = save_checkpoint(tmp_path, 10, model=model, optimizer=opt, extra_state={"s": 10},
                           keep_last=1)

    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):   # crash after the weights and the optimizer are written
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 11, model=model, optimizer=opt, extra_state={}, keep_last=1)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good and len(calls) == 2
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000010"]

    # A process killed before the rename leaves a temp dir (even one with a COMPLETE marker), or
    # someone left a step dir without a marker: both are ignored, and cleaned by the next save.
    ghost = tmp_path / "checkpoints" / ".tmp_step_00000012_abc"
    (ghost).mkdir()
    (ghost / "COMPLETE").write_text(json.dumps({"step": 12, "files": []}))
    (tmp_path / "checkpoints" / "step_00000013").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(latest_checkpoint(tmp_path), model=torch.nn.Linear(8, 8)) == {"s": 10}
    save_checkpoint(tmp_path, 11, model=model, optimizer=opt, extra_state={}, keep_last=5)
    assert not ghost.exists()


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fastrl.trainer.checkpoint import save_checkpoint
    run_dir = sys.argv[1]
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_checkpoint(run_dir, step, model=model, optimizer=opt,
                        extra_state={"step": step}, keep_last=2)
""")


def test_sigkill_during_save_loop(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            latest = latest_checkpoint(tmp_path)
            if latest is not None and checkpoint_step(latest) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        else:
            pytest.fail("checkpoint loop made no progress")
        time.sleep(random.uniform(0.0, 0.3))   # land anywhere inside a save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    complete = list_checkpoints(tmp_path)
    assert 1 <= len(complete) <= 3   # keep_last=2, plus possibly the new one before pruning
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for path in complete:   # every complete-looking checkpoint must be whole and consistent
        step = checkpoint_step(path)
        assert load_checkpoint(path, model=model, optimizer=opt) == {"step": step}
        assert all(torch.all(p == step) for p in model.parameters()), path
    assert latest_checkpoint(tmp_path) == complete[-1]


def test_export_pretrained_loads_in_transformers(tmp_path):
    from fastrl.models.tokenizer import build_tokenizer

    model = tiny_qwen(True, random.randrange(1000)).eval()
    tok = build_tokenizer()
    out = export_pretrained(model, tok, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    tok2 = AutoTokenizer.from_pretrained(out)
    text = "call <tool_call> now"
    assert tok2.encode(text) == tok.encode(text)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        export_pretrained(torch.nn.Linear(2, 2), None, tmp_path / "bad")
