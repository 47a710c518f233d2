"""The data path: token-space trajectories, packing, packed tensors and packed forward passes.

Hot loops run in the compiled extension `fastrl._C` when it is built (`impl="auto"`), with
pure-Python twins in `fastrl.data._reference` (`impl="python"`).
"""
from fastrl.data.chat_template import (TemplateNotPrefixStableError, end_of_turn_id,
                                       render_observation, render_prompt, render_turn_tail)
from fastrl.data.packing import balance_partitions, pack_sequences
from fastrl.data.trajectory import Role, Segment, SequenceStore, Trajectory

__all__ = [
    "Role", "Segment", "SequenceStore", "TemplateNotPrefixStableError", "Trajectory",
    "balance_partitions", "end_of_turn_id", "pack_sequences", "render_observation",
    "render_prompt", "render_turn_tail",
]
