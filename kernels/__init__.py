"""Triton kernels of fastrl, installed as `fastrl.kernels`."""
