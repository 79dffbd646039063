"""Every mode x objective x reference schedule x LoRA either runs two rounds or is refused at load
time with a message naming the keys. Tiny random model, transformers sampler, real files."""

import json

import datasets
import pytest

from online_dpo.config.recipe import RecipeError, recipe_from_dict
from online_dpo.pipeline.run import Run
from tests.conftest import tiny_recipe_dict

MODES = ("online", "fully_online", "offline_from_pi0", "offline_dataset")
OBJECTIVES = ("sigmoid", "kto")
SCHEDULES = ("fixed", "swap", "ema")
REFERENCE_KEYS = {"fixed": {}, "swap": {"swap_every_rounds": 1}, "ema": {"ema_every_steps": 1, "ema_rate": 0.5}}


def _datasets(tmp_path):
    prefs, kto = tmp_path / "prefs.jsonl", tmp_path / "kto.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}?", "chosen": "Blue.",
                                         "rejected": "I would rather not say anything."}) + "\n" for i in range(4)))
    kto.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}?", "completion": c, "label": ok}) + "\n"
                           for i in range(4) for c, ok in (("Blue.", True), ("No idea, sorry!!", False))))
    return {"sigmoid": prefs, "kto": kto}


def _recipe(model_dir, prompts, tmp_path, mode, objective, schedule, lora):
    data = tiny_recipe_dict(model_dir, prompts, tmp_path / "runs", **{
        "generation.samples_per_prompt": 2, "generation.max_tokens": 8, "data.prompts_per_round": 2,
        "data.eval_prompts": 1, "loss.loss_type": objective,
        "reference": {"schedule": schedule, **REFERENCE_KEYS[schedule]}})
    if lora:
        data["train"]["lora"] = {"rank": 2, "alpha": 4}
    if mode == "fully_online":
        del data["data"]["prompts_per_round"]  # derived: micro_batch_pairs x grad_accum_steps = 2
    if mode.startswith("offline"):
        data["mode"] = "offline"
    if mode == "offline_dataset":
        data["data"]["pairs"] = str(_datasets(tmp_path)[objective])
    else:
        data["mode"] = data.get("mode", mode)
    return data


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mode", MODES)
def test_combination_runs_or_is_refused(mode, objective, schedule, lora, tiny_model_dir, prompts_file, tmp_path):
    data = _recipe(tiny_model_dir, prompts_file, tmp_path, mode, objective, schedule, lora)
    if lora and schedule != "fixed":
        with pytest.raises(RecipeError, match=r"train\.lora.*reference\.schedule"):
            recipe_from_dict(data)
        return
    if mode == "fully_online" and objective == "kto":  # several examples per prompt: not one step
        with pytest.raises(RecipeError, match=r"loss\.loss_type: kto.*mode fully_online"):
            recipe_from_dict(data)
        return
    run = Run(recipe_from_dict(data))
    rows = run.execute()
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["optimizer_steps"] > 0 for row in rows), [row["optimizer_steps"] for row in rows]
    for k in (1, 2):
        assert (run.round_dir(k) / "checkpoint" / "model.safetensors").exists()
        reference = json.loads((run.round_dir(k) / "reference.json").read_text())
        assert reference["schedule"] == ("lora_adapter_off" if lora else schedule)
        columns = datasets.load_from_disk(str(run.round_dir(k) / "pairs")).column_names
        assert ("label" in columns) == (objective == "kto") and ("chosen" in columns) == (objective != "kto")
    sampled = [(run.round_dir(k) / "samples.jsonl").exists() for k in (0, 1, 2)]
    assert sampled == {"online": [False, True, True], "fully_online": [False, True, True],
                       "offline_from_pi0": [True, False, False], "offline_dataset": [False, False, False]}[mode]
    if lora:
        assert (run.round_dir(2) / "checkpoint" / "adapter").is_dir()
    if schedule == "ema":
        assert (run.round_dir(2) / "reference_checkpoint").is_dir()
