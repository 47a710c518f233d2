import json
import subprocess
import sys

import pytest

import fastrl


def test_info_reports_versions_and_extension():
    info = fastrl.info()
    import torch

    assert info["fastrl"] == fastrl.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["compiled_extension"], bool)
    assert isinstance(info["cuda_devices"], list)
    # liger-kernel (in the test extra) has no __version__: its version comes from its metadata.
    from importlib.metadata import version

    assert info["liger_kernel"] == version("liger-kernel")


def test_installed_package_uses_compiled_extension():
    # The installed package builds fastrl._C; running without it is only for source trees.
    assert fastrl.compiled_extension_active()
    from fastrl import _C

    assert _C.__compiled__ is True


def test_data_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv("FASTRL_NUM_THREADS", "3")
    assert fastrl.info()["data_threads"] == 3
    monkeypatch.delenv("FASTRL_NUM_THREADS")
    import os

    assert fastrl.info()["data_threads"] == max(1, min(os.cpu_count(), 8))
    from fastrl.data import control_token_mask

    for bad in ("two", "0", "4x"):   # a typo is an error, not a silent fallback
        monkeypatch.setenv("FASTRL_NUM_THREADS", bad)
        with pytest.raises(ValueError, match=f"FASTRL_NUM_THREADS = '{bad}'"):
            control_token_mask([1, 2], [2], impl="cpp")


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "fastrl", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["fastrl"] == fastrl.__version__


def test_no_top_level_kernels_module_is_installed():
    # A top-level `kernels` would shadow Hugging Face's `kernels` package that transformers probes.
    import importlib.util

    import fastrl.kernels  # noqa: F401  (ships inside the fastrl namespace)

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "fastrl" not in (spec.origin or "")
