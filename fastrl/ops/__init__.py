"""Fused log-prob / entropy / control-token statistics and the policy loss, from hidden states."""
from fastrl.ops.linear_policy_loss import PolicyLossConfig, PolicyLossOutput, linear_policy_loss
from fastrl.ops.linear_token_stats import TokenStats, linear_token_stats
from fastrl.ops.token_kind import TokenKind

__all__ = ["TokenKind", "TokenStats", "linear_token_stats", "PolicyLossConfig", "PolicyLossOutput",
           "linear_policy_loss"]
