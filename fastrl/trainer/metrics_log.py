"""Run metrics: one JSON line per step in `run_dir/metrics.jsonl`, monitor events in
`run_dir/events.jsonl`, a compact progress line on the terminal, optional TensorBoard.

JSON lines are the source of truth (plots, drill reports and resumption read them); every line is
flushed as it is written, so a killed run loses at most the line being written. Non-finite floats
are written as the strings "nan", "inf", "-inf" (strict JSON has no NaN) and read back as floats.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"

# (metric key, short label) shown on the progress line when present
PROGRESS_KEYS = (("reward_mean", "reward"), ("success_rate", "succ"),
                 ("format_error_rate", "fmt_err"), ("intrusion_max", "intr_max"),
                 ("spike_count", "spikes"), ("kl_mean", "kl"), ("loss", "loss"),
                 ("grad_norm", "gnorm"), ("lr", "lr"))
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_jsonable(value: Any, key: str = "value") -> Any:
    """Tensors, numpy scalars/arrays and Python numbers as plain JSON values; non-finite floats as
    strings. Raises TypeError naming `key` for anything else."""
    if hasattr(value, "detach"):   # torch.Tensor, without importing torch
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar / array
        value = value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                   ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"metric {key!r} has unsupported type {type(value).__name__}: {value!r}")


def _from_json(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (process killed mid-write) is dropped,
    a corrupt line elsewhere is an error naming the line."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(_from_json(json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: corrupt JSON line ({e})") from None
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    return _read_jsonl(Path(run_dir) / EVENTS_FILE)


def _truncate_after(path: Path, step: int) -> None:
    """Keep records with step <= `step` (and drop a torn last line); rewritten atomically."""
    if not path.is_file():
        return
    kept = [r for r in _read_jsonl(path) if r.get("step", -1) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for r in kept:
            f.write(json.dumps(to_jsonable(r), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"


class MetricsLogger:
    """Per-step metrics and monitor events of one run.

        log = MetricsLogger(run_dir, total_steps=cfg.steps, resume_from_step=resumed_step)
        log.log(step, {"reward_mean": r, "loss": loss})
        log.event(step, "warning", "intrusion spike", intrusion_max=0.4)
        log.close()
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False,
                 progress: bool = True, total_steps: int | None = None,
                 resume_from_step: int | None = None, stream: TextIO | None = None,
                 progress_keys: tuple[tuple[str, str], ...] = PROGRESS_KEYS):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.progress = progress
        self.progress_keys = progress_keys
        self.stream = stream if stream is not None else sys.stdout
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._line_open = False   # a \r progress line is on screen without its newline
        self._last_step_time: tuple[int, float] | None = None

        if resume_from_step is not None:
            # a resumed run restarts after its checkpoint: drop what the crashed run logged later
            _truncate_after(self.run_dir / METRICS_FILE, resume_from_step)
            _truncate_after(self.run_dir / EVENTS_FILE, resume_from_step)
        self._metrics_f = open(self.run_dir / METRICS_FILE, "a")
        self._events_f = open(self.run_dir / EVENTS_FILE, "a")

        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("MetricsLogger(tensorboard=True) needs the `tensorboard` "
                                  f"package (pip install tensorboard): {e}") from e
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=resume_from_step + 1
                                     if resume_from_step is not None else None)

    # ------------------------------------------------------------ writing
    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Append one record for `step`; returns the record as written."""
        record = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if k in ("step", "time"):
                raise ValueError(f"metric name {k!r} is reserved")
            record[str(k)] = to_jsonable(v, str(k))
        self._write(self._metrics_f, record)
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
        if self.progress:
            self._show(step, record)
        return record

    def event(self, step: int, kind: str, message: str, *, echo: bool = True, **fields: Any) -> dict:
        """A monitor warning / action / skipped step, in events.jsonl and on the terminal."""
        record = {"step": int(step), "time": round(time.time(), 3), "kind": str(kind),
                  "message": str(message)}
        for k, v in fields.items():
            if k in record:
                raise ValueError(f"event field {k!r} is reserved")
            record[k] = to_jsonable(v, k)
        self._write(self._events_f, record)
        if self._tb is not None:
            self._tb.add_text(f"events/{kind}", message, int(step))
        if self.progress and echo:   # echo=False: in the file only (e.g. routine SFT warm-up steps)
            extra = " ".join(f"{k}={_fmt(_from_json(v))}" for k, v in record.items()
                             if k not in ("step", "time", "kind", "message"))
            self._print(f"[{kind}] step {step}: {message}" + (f" ({extra})" if extra else ""))
        return record

    def _write(self, f: TextIO, record: dict) -> None:
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()

    # ------------------------------------------------------------ terminal
    def progress_line(self, step: int, record: dict) -> str:
        total = self.total_steps
        parts = []
        if total:
            frac = min(max(step / total, 0.0), 1.0)
            width = 20
            filled = int(round(frac * width))
            parts.append(f"step {step}/{total} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{100 * frac:3.0f}%")
        else:
            parts.append(f"step {step}")
        for key, label in self.progress_keys:
            if key in record:
                parts.append(f"{label} {_fmt(_from_json(record[key]))}")
        now = time.time()
        if self._last_step_time is not None and step > self._last_step_time[0]:
            sec = (now - self._last_step_time[1]) / (step - self._last_step_time[0])
            parts.append(f"{sec:.2f}s/step")
            if total and step < total:
                eta = sec * (total - step)
                parts.append(f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                             f"{int(eta % 60):02d}")
        self._last_step_time = (step, now)
        return " | ".join(parts)

    def _show(self, step: int, record: dict) -> None:
        line = self.progress_line(step, record)
        if self._tty:   # redraw in place; \x1b[K clears what a longer previous line left
            self.stream.write("\r" + line + "\x1b[K")
            self._line_open = True
            self.stream.flush()
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(line + "\n")
        self.stream.flush()

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
        for f in (self._metrics_f, self._events_f):
            if not f.closed:
                f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
