"""The benchmarks cannot rot silently: every script starts, and the headline one runs end to end.

`benchmarks/vs_trl.py` once died in every "ours" run after a signature change in the run, while
its recorded number stood. These tests break on such a move instead of the benchmark.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# workload.py is a shared argument list, not a script; trl_worker.py runs inside .venv-trl.
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py")
                 if p.name not in {"workload.py", "trl_worker.py"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_starts(script):
    """Each script imports what it names at the top and parses its arguments."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def project_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every `from online_dpo... / judges... import names` in a script, those inside functions
    too (most benchmarks import lazily), except the fallbacks under `except ImportError:` that
    keep older trees measurable."""
    tree = ast.parse(path.read_text())
    fallbacks = {id(node) for handler in ast.walk(tree) if isinstance(handler, ast.ExceptHandler)
                 for node in ast.walk(handler)}
    return [(node.module, [alias.name for alias in node.names]) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and id(node) not in fallbacks and node.module
            and node.module.split(".")[0] in {"online_dpo", "judges"}]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if project_imports(REPO / "benchmarks" / s)])
def test_benchmark_imports_resolve(script):
    """Each module and name a script imports from the project exists, so a move or a rename
    breaks here and not in a benchmark run that only reaches the import after minutes."""
    imports = project_imports(REPO / "benchmarks" / script)
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name) or importlib.util.find_spec(f"{module}.{name}"), \
                f"{script}: from {module} import {name}"


@pytest.mark.slow
def test_ours_worker_runs_a_round(smollm2_dir):
    """The "ours" side of vs_trl.py at its smallest size: one round of 2 prompts, real vLLM.
    Its timing comes from the run's own metrics.jsonl, so it follows the run without subclassing it."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ours_worker.py"), "--model", str(smollm2_dir),
         "--pairs", "2", "--micro-batch", "1", "--grad-accum", "2", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["side"] == "ours" and result["prompts"] == 2
    assert len(result["round_seconds"]) == 1 and result["seconds"] > 0
    assert 0 < result["startup_seconds"] < result["total_seconds"]
    assert set(result["phase_seconds"]) >= {"sample", "judge", "train", "sync"}
