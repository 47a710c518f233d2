"""Models: the tiny in-code Qwen2 model and tokenizer used by tests and demos, and control tokens."""
from fastrl.models.tiny import TinyModelConfig, build_tiny_model
from fastrl.models.tokenizer import CONTROL_TOKENS, build_tokenizer, chat_template, control_token_ids

__all__ = ["CONTROL_TOKENS", "TinyModelConfig", "build_tiny_model", "build_tokenizer",
           "chat_template", "control_token_ids"]
