"""Helpers for tests and benchmarks of the rollout path (also handy for trainer tests).

* `build_turn_ending_model`: the tiny random model almost never samples the end-of-turn token
  (p ~ 1/vocab), so its episodes would all be one truncated turn. This variant gives every
  token's embedding a constant first coordinate, which makes the first coordinate of the final
  hidden state large and positive, and raises that coordinate for the end-of-turn token only:
  its logit then stands `eot_boost * h[0]` above the rest, and turns end after ~15 tokens.
  Everything else stays random, so turns are malformed and episodes run to max_turns with error
  observations: the full multi-turn path, at a realistic turn length.
* `ScriptedEngine`: an engine whose "model" is a Python function from the request to the text
  of the turn; completions come back one or a few at a time, in shuffled order, to exercise the
  driver's bookkeeping. Its log-probs are made up (but deterministic per request).
"""
from __future__ import annotations

import random
import zlib
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastrl.models import build_tiny_model
from fastrl.rollout.engine import Completion, Engine, GenerationRequest, check_request


def build_turn_ending_model(output_dir: str, *, eot_boost: float = 0.6, seed: int = 0,
                            **tiny_kwargs) -> str:
    path = build_tiny_model(output_dir, seed=seed, **tiny_kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 1.0
        emb[tok.eos_token_id, 0] = 1.0 + eot_boost
    model.save_pretrained(path)
    return path


class ScriptedEngine(Engine):
    """`policy(request, episode_index, turn) -> str` gives each turn's text; the engine appends
    the end-of-turn token and, like a real engine, ends at the first stop token or at
    max_new_tokens. `batch` is how many completions one `step` returns."""

    def __init__(self, tokenizer, policy: Callable[[GenerationRequest, int, int], str], *,
                 batch: int = 3, seed: int = 0):
        self.tokenizer = tokenizer
        self.policy = policy
        self.batch = batch
        self.rng = random.Random(seed)
        self.weight_version = 0
        self.pending: list[GenerationRequest] = []
        self.log: list[tuple[str, str]] = []   # ("add" | "done", request_id) in order

    def add_request(self, request: GenerationRequest) -> None:
        check_request(request)
        self.pending.append(request)
        self.log.append(("add", request.request_id))

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[Completion]:
        self.rng.shuffle(self.pending)
        out = []
        for r in self.pending[:self.batch]:
            ep, turn = (int(x) for x in r.request_id.split(":"))
            text = self.policy(r, ep, turn)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            ids.append(self.tokenizer.eos_token_id)
            ids = ids[:next(i + 1 for i, t in enumerate(ids) if t in r.stop_token_ids)]
            finish = "stop"
            if len(ids) > r.max_new_tokens:
                ids, finish = ids[:r.max_new_tokens], "length"
            rng = random.Random(zlib.crc32(r.request_id.encode()))
            out.append(Completion(r.request_id, ids, [-rng.uniform(0.01, 3.0) for _ in ids],
                                  finish, self.weight_version, len(r.prompt_ids)))
            self.log.append(("done", r.request_id))
        del self.pending[:self.batch]
        return out

    def abort(self) -> None:
        self.pending.clear()

    def _load_weights(self, state_dict: dict) -> None:
        pass
