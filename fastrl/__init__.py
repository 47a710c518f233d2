"""fastrl: fast, stable reinforcement learning for multi-turn tool-using LLM agents."""
from __future__ import annotations

__version__ = "0.1.0"


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # an optional dependency that is absent or broken is reported as None
        return None
    version = getattr(module, "__version__", None)
    if version is None:   # e.g. liger_kernel has no __version__: ask its distribution's metadata
        from importlib import metadata
        try:
            version = metadata.version(module_name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = "unknown"
    return version


def compiled_extension_active() -> bool:
    """True when the pybind11 extension `fastrl._C` imports (the installed package builds it)."""
    from fastrl.data._impl import compiled

    return compiled() is not None


def _data_threads() -> int:
    """Threads of the compiled data path (FASTRL_NUM_THREADS, else the cores, at most 8); 1 when
    the pure-Python fallback runs."""
    from fastrl.data._impl import compiled

    ext = compiled()
    return ext.max_threads() if ext is not None else 1


def info() -> dict:
    """Versions of fastrl and its stack, whether the compiled extension is active, CUDA devices."""
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "fastrl": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm"),
        "liger_kernel": _version("liger_kernel"),
        "compiled_extension": compiled_extension_active(),
        "data_threads": _data_threads(),
        "cuda_devices": devices,
    }
