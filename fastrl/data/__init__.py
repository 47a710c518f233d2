"""The data path: token-space trajectories, packing, packed tensors and packed forward passes.

Hot loops run in the compiled extension `fastrl._C` when it is built (`impl="auto"`), with
pure-Python twins in `fastrl.data._reference` (`impl="python"`).
"""
from fastrl.data.chat_template import (TemplateNotPrefixStableError, end_of_turn_id,
                                       render_observation, render_prompt, render_turn_tail)
from fastrl.data.packed import (PackedBatch, build_packed_batch, build_packed_batches,
                                control_token_mask, pack_micro_batches, turn_boundaries)
from fastrl.data.packed_forward import PackedOutput, block_causal_mask, packed_forward
from fastrl.data.packing import balance_partitions, pack_sequences
from fastrl.data.trajectory import Role, Segment, SequenceStore, Trajectory

__all__ = [
    "PackedBatch", "PackedOutput", "Role", "Segment", "SequenceStore",
    "TemplateNotPrefixStableError", "Trajectory", "balance_partitions", "block_causal_mask",
    "build_packed_batch", "build_packed_batches", "control_token_mask", "end_of_turn_id",
    "pack_micro_batches", "pack_sequences", "packed_forward", "render_observation",
    "render_prompt", "render_turn_tail", "turn_boundaries",
]
