"""LoRA mode on a tiny real run: one copy of the weights, merged checkpoints, verified sync, resume."""

import json
import signal

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from online_dpo.config.recipe import RecipeError, recipe_from_dict
from online_dpo.pipeline.run import Run
from online_dpo.training.lora import merged_weights
from tests.conftest import cli, tiny_recipe_dict

LORA = {"train.lora": {"rank": 4, "alpha": 8}, "reference.schedule": "fixed", "train.learning_rate": 5e-3}


def test_lora_run_trains_the_adapter_only_and_checkpoints_merged_weights(tiny_model_dir, prompts_file, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    run = Run(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", **LORA)))
    rows = run.execute()
    policy = run.models.policy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with run.steps.reference.scoring(run.trainer.policy, policy_round=2) as reference:
        assert reference is run.models.adapter_off  # no second copy of the model
    # The base weights never moved: the reference is still exactly pi_0.
    for key, value in policy.get_base_model().state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    # The checkpoint is a plain model holding base + adapter, which scores like the policy.
    ckpt = run.round_dir(2) / "checkpoint"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert any(not torch.equal(merged.state_dict()[k], base[k]) for k in base)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert set(dict(merged_weights(policy))) == set(base)
    sync = json.loads((run.round_dir(1) / "sync.json").read_text())
    assert sync["probe_max_abs_diff"] < sync["probe_tolerance"]  # the sampler got the merged weights
    assert rows[1]["kl_to_reference"] > 0 and rows[1]["kl_to_pi0"] == rows[1]["kl_to_reference"]


def test_lora_needs_a_fixed_reference(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(RecipeError, match="train.lora: needs reference.schedule: fixed"):
        recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path,
                                          **{**LORA, "reference.schedule": "swap"}))


def test_killed_lora_run_resumes_from_its_adapter(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", **LORA)))
    straight = cli("run", str(recipe), "name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli("run", str(recipe), "name=killed", kill_at="round_2/train_step_1")
    assert killed.returncode == -signal.SIGKILL
    resumed = cli("run", str(recipe), "name=killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: policy from round_1/checkpoint" in resumed.stdout
    rows = [[json.loads(x) for x in (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("straight", "killed")]
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["judge_score"] == pytest.approx(b["judge_score"], abs=1e-9)


def test_a_bf16_base_keeps_the_adapter_and_its_merge_in_float32(tiny_model_dir, prompts_file, tmp_path):
    """train.lora.base_dtype: the frozen base in bf16 (the CUDA default), the adapter in float32;
    the stream merges each adapted layer in float32 and passes the rest of the base as it is."""
    from online_dpo.training.models import Models

    lora = {**LORA, "train.lora": {**LORA["train.lora"], "base_dtype": "bfloat16"}}
    from online_dpo.sampling.weight_sync import probe_tolerance

    recipe = recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path, **lora))
    assert probe_tolerance(recipe) == 0.1  # a float32 sampler against a bf16 trainer: bf16 rounding
    models = Models(recipe)
    dtypes = {(p.requires_grad, p.dtype) for p in models.policy.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    merged = dict(models.policy_weights())
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert merged["model.embed_tokens.weight"].dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).state_dict()
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert models.pi0_probe.dtype == torch.float32 and torch.isfinite(models.pi0_probe).all()


def _saved_bytes_loss_and_grads(model, ids, autocast: bool):
    """What autograd keeps for the backward of one forward (unique storages), and the results."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    return sum(storages.values()), loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "cpu-autocast"])
def test_a_bf16_base_keeps_one_copy_of_each_input_for_the_adapter(tiny_model_dir, autocast):
    """PEFT casts each adapted module's input to the adapter's float32, and autograd keeps every
    cast (under autocast, as autocast's bf16 copy of it: CUDA's path); `add_adapter` keeps the
    base's bf16 input once instead, with the same loss and gradients."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from online_dpo.config.recipe import AdapterConfig
    from online_dpo.training.lora import InputKeepingLinear, add_adapter

    def adapted(build):
        torch.manual_seed(0)
        model = build(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero, so A's gradients are too
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        return model

    ours = adapted(lambda m: add_adapter(m, AdapterConfig(rank=4, alpha=8)))
    peft = adapted(lambda m: get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules="all-linear", task_type="CAUSAL_LM")))
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
    saved, loss, grads = _saved_bytes_loss_and_grads(ours, ids, autocast)
    peft_saved, peft_loss, peft_grads = _saved_bytes_loss_and_grads(peft, ids, autocast)
    assert torch.equal(loss, peft_loss) and grads.keys() == peft_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    # What PEFT's path keeps per module and ours does not: its float32 casts, or autocast's bf16 copies.
    layers = [m for m in peft.modules() if isinstance(m, LoraLayer)]
    copies = sum((2 if autocast else 4) * m.get_base_layer().in_features * ids.numel() for m in layers)
    assert peft_saved - saved > 0.4 * copies, (peft_saved, saved, copies)
    # With lora dropout PEFT's own path stays: the dropout makes a tensor per module anyway.
    dropped = adapted(lambda m: add_adapter(m, AdapterConfig(rank=4, alpha=8, dropout=0.1)))
    assert not any(isinstance(m, InputKeepingLinear) for m in dropped.modules())
