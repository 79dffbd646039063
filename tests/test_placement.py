"""The colocated engine's GPU budget, checked before vLLM starts: its share of the GPU plus what
training adds later (gradients and Adam moments), against what is free with the models loaded."""

import pytest

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.sampling.placement import (
    GIB,
    EngineDoesNotFitError,
    GPUBudget,
    check_engine_fits,
    shares_the_trainers_gpu,
)
from tests.test_config import minimal

H100 = 80 * GIB


def budget(**changes) -> GPUBudget:
    # Llama-3.1-8B under FSDP2 on 8 GPUs: its 4 GB shard loaded, 76 GB free.
    fields = dict(device="cuda:0", total=H100, free=76 * GIB, utilization=0.3, trained_params=8_030_000_000,
                  shards=8, sleep=False)
    return GPUBudget(**{**fields, **changes})


def test_training_state_is_twelve_bytes_per_trained_parameter_split_over_the_shards():
    assert budget().training == 12 * 8_030_000_000 // 8
    assert budget(shards=1).training == 12 * 8_030_000_000
    assert budget().engine == int(0.3 * H100)


def test_an_engine_that_fits_beside_training_passes():
    check_engine_fits(budget())  # 24 GiB engine + 11.2 GiB of training state in 76 GiB


def test_whole_training_state_on_every_gpu_does_not_fit_beside_the_engine():
    """DDP at 8B: 89.7 GiB of gradients and moments on each GPU. vLLM's own check (24 GiB free)
    passes; the first train step would not."""
    with pytest.raises(EngineDoesNotFitError, match=r"gpu_memory_utilization=0.3 reserves 24.0 GiB of 80.0 GiB, "
                       r"and training will add 89.7 GiB .* set generation.sleep: true"):
        check_engine_fits(budget(shards=1, free=48 * GIB))


def test_asleep_the_engine_and_training_take_turns():
    tight = budget(free=30 * GIB, utilization=0.35)  # 28 GiB engine + 11.2 GiB > 30 GiB
    with pytest.raises(EngineDoesNotFitError, match="together more than the 30.0 GiB free"):
        check_engine_fits(tight)
    check_engine_fits(budget(free=30 * GIB, utilization=0.35, sleep=True))
    with pytest.raises(EngineDoesNotFitError, match="either of which more than") as error:
        check_engine_fits(budget(free=20 * GIB, utilization=0.35, sleep=True))
    assert "generation.sleep: true" not in str(error.value)  # already on: not suggested again


def test_which_samplers_share_the_trainers_gpu():
    def generation(**keys):
        return recipe_from_dict(minimal(generation=keys)).generation

    assert shares_the_trainers_gpu(generation(backend="vllm"))
    assert not shares_the_trainers_gpu(generation(backend="transformers"))
    assert not shares_the_trainers_gpu(generation(backend="vllm_server", server={"url": "http://127.0.0.1:8000"}))
    launched = {"launch": {"port": 8011}}
    assert shares_the_trainers_gpu(generation(backend="vllm_server", server=launched))
    assert not shares_the_trainers_gpu(
        generation(backend="vllm_server", server={"launch": {"port": 8011, "devices": "1"}}))
