"""generation.sleep: the colocated vLLM engine sleeps while the trainer trains and wakes for the
weight sync. vLLM's sleep mode needs CUDA, which this CPU machine lacks: these are unit tests of
the orchestration (when the engine sleeps and wakes, in which order), with a recording stand-in
for vLLM's LLM, plus the wiring in a real tiny run."""

import pytest

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.run import Run
from online_dpo.sampling.transformers_generator import HFGenerator
from online_dpo.sampling.vllm_engine import VLLMGenerator
from tests.conftest import tiny_recipe_dict


class RecordingLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, args):
        self.calls.append((method, len(args[0])))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def engine(sleep: bool) -> VLLMGenerator:
    gen = object.__new__(VLLMGenerator)  # no engine start: vLLM's sleep mode needs CUDA
    gen.llm, gen.sleep, gen.asleep, gen.weight_version = RecordingLLM(), sleep, False, "run@round-0"
    return gen


def test_the_engine_sleeps_level_2_and_wakes_weights_then_cache_around_the_sync():
    gen = engine(sleep=True)
    gen.release()
    assert gen.asleep and gen.weight_version is None
    with pytest.raises(RuntimeError, match="asleep"):  # nothing samples from an engine without weights
        gen.generate([[1, 2]], None)
    gen.release()  # idempotent
    gen.load_weights([("w", None)])
    assert gen.llm.calls == [("sleep", 2), ("wake_up", ("weights",)), ("sync_weights", 1),
                             ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert not gen.asleep


def test_without_sleep_mode_the_engine_never_sleeps():
    gen = engine(sleep=False)
    gen.release()
    gen.load_weights([("w", None)])
    assert gen.llm.calls == [("sync_weights", 1), ("reset_prefix_cache",)]


def test_every_training_step_releases_the_engine_before_it_trains_and_the_sync_follows(
        tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(HFGenerator, "release", lambda self: events.append("release"))
    load = HFGenerator.load_weights
    monkeypatch.setattr(HFGenerator, "load_weights", lambda self, named: (events.append("load"), load(self, named)))
    Run(recipe_from_dict(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path))).execute()
    trained = [k for k in (1, 2) if (tmp_path / "tiny" / f"round_{k}" / "sync.json").read_text().find("skipped") < 0]
    assert trained and events == ["release", "load"] * len(trained)
