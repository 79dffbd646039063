"""Every shipped module imports (a module that cannot even be imported is a shipped bug)."""

import importlib
import pkgutil

import pytest

import judges
import online_dpo

MODULES = sorted(
    m.name for pkg in (online_dpo, judges)
    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")
)


def test_found_modules():
    assert "online_dpo.pipeline.run" in MODULES and "judges.protocol" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
