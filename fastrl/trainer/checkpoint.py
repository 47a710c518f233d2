"""Crash-safe training checkpoints and Hugging Face export.

Layout of one checkpoint, `run_dir/checkpoints/step_00000120/`:

    model.safetensors   weights (tied/shared tensors stored once, see safetensors' save_model)
    optimizer.pt        optimizer.state_dict(), or for an FSDP2-sharded model the full state keyed
                        by parameter name (torch.distributed.checkpoint's get_optimizer_state_dict)
    scheduler.pt        scheduler.state_dict() (when a scheduler is given)
    rng.pt              python / numpy / torch CPU / CUDA generator states
    extra_state.json    the trainer's own state (data position, monitor, config...), or
    extra_state.pt      when it is not plain JSON
    COMPLETE            written last; JSON with the step and file list

An FSDP2-sharded model is gathered first (`gather_train_state`, a collective on every rank) and
rank 0 writes the same files; `load_checkpoint` on a sharded model reads them on rank 0 and
broadcasts them into the shards (also a collective). The weights file is the same either way, so a
sharded run's checkpoint loads into one process and back.

A checkpoint is written into a hidden temp directory next to its final place, every file is
fsynced, then the directory is renamed into place. A crash at any moment leaves either the
previous set of complete checkpoints or the new one, never a directory that looks complete but
is torn. Old checkpoints are renamed away before deletion for the same reason.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"    # being written
_DEL_PREFIX = ".del_"    # being deleted


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp and half-deleted dirs are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint directory was saved at (from its COMPLETE marker)."""
    return int(json.loads((Path(path) / COMPLETE).read_text())["step"])


# ---------------------------------------------------------------- saving

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms without directory fds: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as plain lists/ints so torch.load(weights_only=True) accepts it
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; "
                          "CUDA random streams are not restored")
        elif len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has {len(cuda)} CUDA RNG states but "
                          f"{torch.cuda.device_count()} devices are visible; restoring the "
                          "first ones only")
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        else:
            torch.cuda.set_rng_state_all(cuda)


def _to_tuples(x: Any) -> Any:
    # random.setstate wants (version, tuple_of_ints, gauss); serialisers may hand back lists
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuples(v) for v in x)
    return x


def _json_roundtrips(obj: Any) -> bool:
    try:
        return json.loads(json.dumps(obj, allow_nan=False)) == obj
    except (TypeError, ValueError):
        return False


def _is_sharded(model) -> bool:
    from fastrl.trainer.distributed import is_sharded
    return is_sharded(model)


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def gather_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                       ) -> tuple[dict, dict | None]:
    """(full weights, full optimizer state) of an FSDP2-sharded model, on CPU on rank 0 and empty
    elsewhere. A collective: every rank calls it, then rank 0 passes both to save_checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _state_dict_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return weights, optim


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """name -> the first name of the same parameter, for every parameter registered twice."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return {k: v for k, v in out.items() if k != v}


def _save_weights(state: dict, path: Path, metadata: dict) -> None:
    """A gathered state dict to safetensors, each storage once (tied weights share one)."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v.contiguous()
    save_file(out, str(path), metadata=metadata)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None = None, extra_state: dict | None = None,
                    keep_last: int | None = 3, model_state: dict | None = None,
                    optimizer_state: dict | None = None, keep: str | os.PathLike | None = None) -> Path:
    """Write a complete checkpoint for `step` atomically and keep the newest `keep_last`
    (None keeps all) plus `keep` (the trainer's rollback target), whatever its age. Returns the
    checkpoint directory.

    `model_state` / `optimizer_state` (from `gather_train_state`, for a sharded model) are
    written instead of `model`'s and `optimizer`'s own state dicts."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}_", dir=root))
    try:
        files = ["model.safetensors"]
        if model_state is not None:
            _save_weights(model_state, tmp / "model.safetensors", {"step": str(step)})
        else:
            # save_model stores each shared storage once (tied embeddings) and load_model re-ties
            save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        optimizer_format = None
        if optimizer_state is not None or optimizer is not None:
            optimizer_format = "by_name" if optimizer_state is not None else "by_index"
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                       tmp / "optimizer.pt")
            files.append("optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            files.append("scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        files.append("rng.pt")
        extra_state = {} if extra_state is None else extra_state
        if _json_roundtrips(extra_state):
            (tmp / "extra_state.json").write_text(json.dumps(extra_state, indent=1))
            files.append("extra_state.json")
        else:  # tensors, tuples, int keys, NaN...: keep them exact
            torch.save(extra_state, tmp / "extra_state.pt")
            files.append("extra_state.pt")
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files,
                                                "optimizer_format": optimizer_format}))
        for name in files + [COMPLETE]:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        # Only now that the new checkpoint is in place; never delete the one just written.
        spared = {final} | ({Path(keep)} if keep is not None else set())
        older = [p for p in list_checkpoints(run_dir) if p not in spared]
        for p in older[: max(0, len(older) - (keep_last - 1))]:
            _discard(p)
    return final


def _discard(path: Path) -> None:
    """Rename out of the `step_*` namespace first: a crash mid-rmtree must not leave a
    directory that still has its COMPLETE marker but lost its weights."""
    trash = path.with_name(f"{_DEL_PREFIX}{path.name}_{os.getpid()}_{random.getrandbits(32):08x}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp and half-deleted directories left by a crashed process (single writer per run)."""
    for p in root.iterdir():
        if p.name.startswith((_TMP_PREFIX, _DEL_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- loading

def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, restore_rng: bool = True) -> dict:
    """Restore model (bitwise), optimizer, scheduler and RNG streams in place; returns the
    `extra_state` dict that was saved. `path` is a checkpoint dir (see latest_checkpoint)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    optimizer_format = json.loads((path / COMPLETE).read_text()).get("optimizer_format") or "by_index"
    if optimizer is not None and not (path / "optimizer.pt").is_file():
        raise FileNotFoundError(f"{path} has no optimizer.pt (saved without an optimizer)")
    if _is_sharded(model):
        _load_sharded(path, model, optimizer, optimizer_format)
    else:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                         device=str(device) if device.type != "meta" else "cpu")
        # A tied weight may be stored under either of its names (a sharded run stores both).
        tied = {n for pair in _tied_names(model).items() for n in pair}
        bad = [k for k in list(missing) + list(unexpected) if k not in tied]
        if bad:
            raise ValueError(f"{path / 'model.safetensors'} does not match the model: "
                             f"missing {[k for k in missing if k in bad]}, "
                             f"unexpected {[k for k in unexpected if k in bad]}")
    if optimizer is not None and not _is_sharded(model):
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if optimizer_format == "by_name":   # written by a sharded run
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state, options=_state_dict_options())
        else:
            optimizer.load_state_dict(state)
    if scheduler is not None:
        if not (path / "scheduler.pt").is_file():
            raise FileNotFoundError(f"{path} has no scheduler.pt (saved without a scheduler)")
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    if (path / "extra_state.json").is_file():
        return json.loads((path / "extra_state.json").read_text())
    # our own file, written by save_checkpoint: may hold arbitrary picklable objects
    return torch.load(path / "extra_state.pt", map_location="cpu", weights_only=False)


def _load_sharded(path: Path, model, optimizer, optimizer_format: str) -> None:
    """Rank 0 reads the full weights (and optimizer state) and broadcasts them into every rank's
    shards. A collective: every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    if optimizer is not None and optimizer_format != "by_name":
        raise ValueError(f"{path}: its optimizer state was saved by an unsharded run (keyed by index); "
                         "an FSDP2-sharded model needs one keyed by parameter name (saved by a sharded run)")
    opts = _state_dict_options(broadcast_from_rank0=True)
    weights, optim = {}, {}
    if dist.get_rank() == 0:
        weights = load_file(str(path / "model.safetensors"))
        for name, tied_to in _tied_names(model).items():   # stored once: give both names
            if name not in weights and tied_to in weights:
                weights[name] = weights[tied_to]
            elif tied_to not in weights and name in weights:
                weights[tied_to] = weights[name]
        if optimizer is not None:
            optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim, options=opts)


# ---------------------------------------------------------------- export

def export_pretrained(model: Any, tokenizer: Any | None, out_dir: str | os.PathLike,
                      state_dict: dict | None = None) -> Path:
    """Save a Hugging Face model (+ tokenizer) with safetensors so that transformers'
    `from_pretrained` and vLLM load it. Written to a temp dir and renamed into place.
    `state_dict` (the gathered weights of a sharded model, see `full_state_dict`) is saved
    instead of the model's own."""
    out = Path(out_dir)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"export_pretrained needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__} (unwrap torch.compile / FSDP first)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}_", dir=out.parent))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)  # safetensors is the default format
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        if out.exists():
            _discard(out)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
