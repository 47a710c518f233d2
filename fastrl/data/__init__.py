"""The data path: token-space trajectories, packing, packed tensors and packed forward passes.

Hot loops run in the compiled extension `fastrl._C` when it is built (`impl="auto"`), with
pure-Python twins in `fastrl.data._reference` (`impl="python"`).
"""
from fastrl.data.packing import balance_partitions, pack_sequences

__all__ = ["balance_partitions", "pack_sequences"]
