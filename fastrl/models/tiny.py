"""A tiny randomly initialised Llama model plus the in-code tokenizer, saved in Hugging Face format.

Used by tests, demos and CPU benchmarks: nothing is downloaded, and the same directory loads in
`AutoModelForCausalLM`, `AutoTokenizer` and vLLM. The architecture is Llama's (Qwen2's without
the QKV bias) rather than Qwen2's because a `qwen2` model type makes AutoTokenizer replace the
tokenizer's number-chunking pre-tokenizer (see fastrl.models.tokenizer). Defaults (2 layers,
hidden 128, 4 heads of head_dim 32, ~0.75M parameters) SFT on 2 CPU cores in minutes; the demo uses
three layers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from fastrl.models.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4          # head_dim = hidden_size / num_heads = 32 (a size vLLM supports)
    num_kv_heads: int = 2       # grouped-query attention, as in Qwen2 and Llama 3
    intermediate_size: int = 352
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    vocab_multiple: int = 64    # embedding rows padded up to a multiple (rows past the tokenizer unused)
    rope_theta: float = 10000.0

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        for field in ("hidden_size", "num_layers", "intermediate_size", "vocab_multiple"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")


def tiny_config(vocab_size: int, eos_id: int, pad_id: int, cfg: TinyModelConfig) -> LlamaConfig:
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    return LlamaConfig(
        vocab_size=padded,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )


def build_tiny_model(output_dir: str | os.PathLike, *, vocab: list[str] | tuple[str, ...] = (),
                     hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                     num_kv_heads: int = 2, intermediate_size: int = 352,
                     tie_word_embeddings: bool = True, max_position_embeddings: int = 4096,
                     seed: int = 0) -> str:
    """Write a random LlamaForCausalLM, its tokenizer (with `vocab` as extra whole-word tokens)
    and a generation config to output_dir; returns the directory as a string."""
    cfg = TinyModelConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          tie_word_embeddings=tie_word_embeddings,
                          max_position_embeddings=max_position_embeddings)
    cfg.validate()
    tokenizer = build_tokenizer(extra_words=vocab)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = tiny_config(len(tokenizer), eos_id, pad_id, cfg)

    # Same seed -> same weights, independent of the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
                                               bos_token_id=None)

    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


__all__ = ["TinyModelConfig", "build_tiny_model", "tiny_config"]
