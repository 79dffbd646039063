"""CLI flags that must act before torch is imported."""

import os

import pytest

from online_dpo.cli import _set_threads


def test_threads_flag_sets_the_thread_env_anywhere_on_the_line(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    _set_threads(["run", "recipe.yaml", "--threads", "1", "rounds=2"])
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    _set_threads(["run", "recipe.yaml"])  # no flag: the environment is left alone
    assert os.environ["OMP_NUM_THREADS"] == "7"
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        _set_threads(["run", "recipe.yaml", "--threads", "0"])
