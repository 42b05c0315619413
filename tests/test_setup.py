"""The set-up `make test` installs is complete: every dependency the tests use imports.

Several test files guard optional parts with ``pytest.importorskip`` (numba, triton, opacus, mlxtend,
PIL), so that the package's tests still run where a user lacks one of them. Under `make test` they are
all installed (pyproject's ``test`` extra, pinned in constraints.txt): this test turns a broken or
partial install, which would otherwise show up only as skipped tests, into a failure.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# distribution name -> module it installs, where they differ; pillow comes with matplotlib (the
# image-folder data tests use it)
_MODULE = {"pillow": "PIL", "pytest-timeout": "pytest_timeout"}


def _requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["test"]
    return sorted({r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in names} | {"pillow"})


@pytest.mark.parametrize("dist", _requirements())
def test_every_dependency_of_the_tests_imports(dist):
    importlib.import_module(_MODULE.get(dist, dist))


def test_a_hung_test_times_out(pytestconfig):
    """pytest-timeout is active with the project's limit, so a hang fails its test instead of the whole run."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) == 600
