"""pi_0's reference log-probs cached across runs: same numbers, computed once, keyed honestly."""

import json

import torch

from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.run import Run
from online_dpo.storage.ref_cache import ReferenceLogpCache, model_fingerprint
from tests.conftest import tiny_recipe_dict

SEQS = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10]), ([1, 2, 3], [4, 6])]


def test_cache_computes_each_sequence_once_and_survives_a_torn_line(tmp_path):
    calls = []

    def compute(seqs):
        calls.append(list(seqs))
        return torch.tensor([-1.2345678, -2.5, -0.1][:len(seqs)], dtype=torch.float32)

    cache = ReferenceLogpCache("fp", root=tmp_path)
    first, hits = cache.score(SEQS[:2], compute)
    assert hits == 0 and len(calls) == 1
    with cache.path.open("a") as f:
        f.write('{"key": "torn')  # a run killed mid-append
    again = ReferenceLogpCache("fp", root=tmp_path)
    second, hits = again.score(SEQS, compute)
    assert hits == 2 and calls[-1] == [SEQS[2]]  # only the new sequence is computed
    assert torch.equal(second[:2], first)  # bit-exact float32 round trip through the file
    assert ReferenceLogpCache("other", root=tmp_path).score(SEQS[:1], compute)[1] == 0


def test_fingerprint_follows_weights_dtype_and_batching(tiny_model_dir, tmp_path):
    base = model_fingerprint(tiny_model_dir, dtype=torch.float32, device="cpu", padding_free=True)
    assert base == model_fingerprint(tiny_model_dir, dtype=torch.float32, device="cpu", padding_free=True)
    assert base != model_fingerprint(tiny_model_dir, dtype=torch.bfloat16, device="cpu", padding_free=True)
    assert base != model_fingerprint(tiny_model_dir, dtype=torch.float32, device="cpu", padding_free=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            data = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit in the weights
        (copy / f.name).write_bytes(data)
    assert base != model_fingerprint(copy, dtype=torch.float32, device="cpu", padding_free=True)


def test_a_second_offline_run_reuses_pi0_logps(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINE_DPO_REFERENCE_CACHE", str(tmp_path / "cache"))  # empty at the start
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}?", "chosen": "Blue.",
                                         "rejected": "Something else entirely, I think."}) + "\n"
                             for i in range(4)))
    rows = []
    for name in ("first", "second"):
        data = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", mode="offline", name=name,
                                rounds=1, **{"data.pairs": str(pairs), "reference.schedule": "fixed"})
        rows.append(Run(recipe_from_dict(data)).execute()[0])
    assert rows[0]["reference_cache_hits"] == 0
    assert rows[1]["reference_cache_hits"] == 2 * rows[1]["train_pairs"] == 8
    assert rows[1]["loss"] == rows[0]["loss"]  # same numbers as the forward pass gave
