"""Rollout engine on transformers `generate`: the reference engine, and the default where vLLM is
not installed. Each `step` runs every pending request in left-padded batches to completion, so a
turn of one episode waits for the slowest request of its batch (vLLM's engine does not)."""
from __future__ import annotations

from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from fastrl.rollout.engine import Completion, Engine, GenerationRequest, check_request

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(Engine):
    batch_per_step = True

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str | None = None,
                 max_batch_size: int = 64, logprobs_mode: str = "raw", model=None,
                 tokenizer=None):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = model or AutoModelForCausalLM.from_pretrained(model_path,
                                                                   dtype=_DTYPES[dtype])
        self.model.to(self.device).eval()
        # A blank generation config: checkpoint defaults (top_k, repetition penalty, ...) would
        # make the sampled distribution differ from the vLLM engine's.
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id,
                                                        bos_token_id=None)
        self.max_batch_size = max_batch_size
        self.logprobs_mode = logprobs_mode
        self.weight_version = 0
        self._pending: list[GenerationRequest] = []

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        check_request(request)
        self._pending.append(request)

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def abort(self) -> None:
        self._pending.clear()

    def step(self) -> list[Completion]:
        pending, self._pending = self._pending, []
        # One generate call needs one set of decoding parameters and stop tokens.
        groups: dict[tuple, list[GenerationRequest]] = defaultdict(list)
        for r in pending:
            groups[(r.temperature, r.top_p, tuple(sorted(r.stop_token_ids)))].append(r)
        out = []
        for batch in groups.values():
            for i in range(0, len(batch), self.max_batch_size):
                out += self._generate(batch[i:i + self.max_batch_size])
        return out

    @torch.no_grad()
    def _generate(self, batch: list[GenerationRequest]) -> list[Completion]:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding: every row's next token is at the end
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        first = batch[0]
        greedy = first.temperature == 0
        stops = list(first.stop_token_ids) or None
        kwargs = dict(max_new_tokens=max(r.max_new_tokens for r in batch), do_sample=not greedy,
                      top_k=0, repetition_penalty=1.0, eos_token_id=stops,
                      pad_token_id=self.pad_id, return_dict_in_generate=True,
                      output_logits=True, output_scores=True)
        if not greedy:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        seeds = [r.seed for r in batch if r.seed is not None]
        # transformers samples a whole batch from the global generator: seed it per batch.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seeds:
                torch.manual_seed(hash(tuple(seeds)) % (2**63))
            res = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device), **kwargs)
        new = res.sequences[:, width:].cpu()
        steps = res.scores if self.logprobs_mode == "processed" and not greedy else res.logits
        # (batch, steps) log-probs of the generated tokens.
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in steps], dim=1).cpu()
        logps = logps.gather(-1, new[:, :logps.shape[1], None]).squeeze(-1)

        out = []
        stop_set = set(first.stop_token_ids)
        for row, r in enumerate(batch):
            toks = new[row].tolist()[:r.max_new_tokens]
            end = next((k + 1 for k, t in enumerate(toks) if t in stop_set), None)
            finish = "stop" if end is not None else "length"
            toks = toks[:end] if end is not None else toks
            out.append(Completion(r.request_id, toks, logps[row, :len(toks)].tolist(), finish,
                                  self.weight_version, len(r.prompt_ids)))
        return out

    # ---- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def _load_weights(self, state_dict: dict) -> None:
        params = self.model.state_dict(keep_vars=True)  # tied weights appear under each name
        unknown = [k for k in state_dict if k not in params]
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} unknown weight(s), e.g. {unknown[0]!r}")
        for name, value in state_dict.items():
            if params[name].shape != value.shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, "
                                 f"the engine's is {tuple(params[name].shape)}")
            params[name].copy_(value)
