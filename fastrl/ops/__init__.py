"""Fused log-prob / entropy / control-token statistics and the policy loss, from hidden states."""
from fastrl.ops.token_kind import TokenKind

__all__ = ["TokenKind"]
