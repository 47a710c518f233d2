"""Environments for multi-turn tool use: tools, call parsing, the synthetic arithmetic/lookup
env and the BFCL multi-turn env. The interface is described in fastrl.envs.base."""
from fastrl.envs.base import (EpisodeState, RewardWeights, StepResult, TurnInfo, combine_rewards)
from fastrl.envs.parsing import FUNCTION_TAG, HERMES, SYNTAXES, CallSyntax, ParsedCall, ParsedTurn
from fastrl.envs.synthetic import (SPLITS, SyntheticConfig, SyntheticEnv, SyntheticTask,
                                   make_tasks)
from fastrl.envs.tools import (Tool, ToolExecutor, ToolRegistry, ToolResult, schema_from_function,
                               tool, validate_arguments)

__all__ = ["CallSyntax", "EpisodeState", "FUNCTION_TAG", "HERMES", "ParsedCall", "ParsedTurn",
           "RewardWeights", "SPLITS", "SYNTAXES", "StepResult", "SyntheticConfig", "SyntheticEnv",
           "SyntheticTask", "Tool", "ToolExecutor", "ToolRegistry", "ToolResult", "TurnInfo",
           "combine_rewards", "make_tasks", "schema_from_function", "tool", "validate_arguments"]
