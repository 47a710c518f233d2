"""The rollout-engine interface shared by the vLLM and transformers engines, and `make_engine`.

An engine takes token-id prompts and returns sampled token ids with their log-probs; it never
sees text. Requests go in one at a time (`add_request`) and come back as they finish (`step`), so
the episode driver can submit an episode's next turn as soon as its tools return, without a
batch-wide barrier per turn (the transformers engine batches whatever is pending per `step`).

Log-probs: "raw" (default) are log-softmax of the model's logits, what a trainer's forward pass
computes for the same tokens; "processed" are those of the distribution actually sampled from
(after temperature and top-p), for importance ratios against the sampler.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()   # generation ends after emitting one of these


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str                     # "stop" (a stop token was emitted) or "length"
    weight_version: int = 0
    prompt_len: int = 0


class Engine:
    """Base class: subclasses set `tokenizer` and implement `add_request`, `step`,
    `has_unfinished` and `_load_weights`. `weight_version` is stamped on every completion."""
    tokenizer = None
    weight_version: int = 0
    logprobs_mode: str = "raw"
    # True for engines that run each step's requests as one synchronous batch: the driver then
    # waits for every running env step before stepping, so a turn is one batch, not many small
    # ones (the per-turn barrier of classic synchronous rollouts).
    batch_per_step: bool = False

    def add_request(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def step(self) -> list[Completion]:
        """Advance generation; returns the requests that finished."""
        raise NotImplementedError

    def has_unfinished(self) -> bool:
        raise NotImplementedError

    def _load_weights(self, state_dict: dict) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Drop every request in flight (after a failed rollout), leaving the engine usable."""
        raise NotImplementedError

    def update_weights(self, state_dict: dict, version: int) -> None:
        """Load the trainer's weights in place; everything sampled afterwards carries `version`.
        Refused while requests are in flight: their tokens would mix two policies."""
        if self.has_unfinished():
            raise RuntimeError(f"update_weights(version={version}) while requests are in flight: "
                               "finish or drain the current rollouts first")
        if not isinstance(version, int) or version < self.weight_version:
            raise ValueError(f"weight version must be an int >= the current one "
                             f"({self.weight_version}), got {version!r}")
        self._load_weights(state_dict)
        self.weight_version = version

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Run requests to completion; results in request order."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one generate call")
        for r in requests:
            self.add_request(r)
        done: dict[str, Completion] = {}
        while self.has_unfinished():
            for c in self.step():
                done[c.request_id] = c
        return [done[i] for i in ids]

    def close(self) -> None:
        pass


def check_request(request: GenerationRequest) -> None:
    if len(request.prompt_ids) == 0:
        raise ValueError(f"request {request.request_id}: empty prompt")
    if request.max_new_tokens < 1:
        raise ValueError(f"request {request.request_id}: max_new_tokens must be >= 1, "
                         f"got {request.max_new_tokens}")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: str, model_path: str, **options) -> Engine:
    """kind: "vllm", "hf" (transformers `generate`) or "auto" (vLLM where installed)."""
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        from fastrl.rollout.engine_vllm import VLLMEngine
        return VLLMEngine(model_path, **options)
    if kind == "hf":
        from fastrl.rollout.engine_hf import HFEngine
        return HFEngine(model_path, **options)
    raise ValueError(f"unknown engine kind {kind!r}; expected 'vllm', 'hf' or 'auto'")
