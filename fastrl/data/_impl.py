"""Choosing between the compiled (`fastrl._C`) and pure-Python (`_reference`) implementations,
and the input checks both share (integer-ness is checked here, before pybind11 would cast)."""
from __future__ import annotations

from types import ModuleType

import numpy as np

from fastrl.data import _reference

IMPLS = ("auto", "cpp", "python")


def compiled() -> ModuleType | None:
    try:
        from fastrl import _C
    except ImportError:
        return None
    return _C


def backend(impl: str = "auto") -> ModuleType:
    """`auto`: the compiled extension when it imports, else Python; `cpp`/`python` force one."""
    if impl not in IMPLS:
        raise ValueError(f"impl = {impl!r}: expected one of {IMPLS}")
    if impl == "python":
        return _reference
    ext = compiled()
    if ext is None and impl == "cpp":
        raise ImportError("impl='cpp' needs the compiled extension fastrl._C, which did not "
                          "import; build it with `pip install -e .` (needs a C++17 compiler) "
                          "or use impl='python'")
    return ext if ext is not None else _reference


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def as_int_array(values, name: str) -> np.ndarray:
    """A 1-D int64 array from integers; any non-integer item is a ValueError naming it."""
    if isinstance(values, np.ndarray):
        flat = values.ravel()
        if flat.dtype.kind in "iu":
            return np.ascontiguousarray(flat, dtype=np.int64)
        if flat.size == 0:
            return np.zeros(0, np.int64)
        bad = 0
        if flat.dtype.kind == "f":  # name the first value with a fraction, if there is one
            fractional = np.flatnonzero(flat != np.floor(flat))
            bad = int(fractional[0]) if len(fractional) else 0
        raise ValueError(f"{name}[{bad}] = {_plain(flat[bad])!r}: must be an integer "
                         f"(got an array of {flat.dtype})")
    values = list(values)
    for i, value in enumerate(values):
        if not _is_int(value):
            raise ValueError(f"{name}[{i}] = {_plain(value)!r}: must be an integer")
    return np.array(values, dtype=np.int64).reshape(-1)


def as_int(value, name: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} = {_plain(value)!r}: must be an integer")
    return int(value)
