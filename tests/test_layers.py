"""The package's dependency contracts (pyproject.toml, checked by ``lint-imports`` in CI) hold,
and catch what they are there to catch: an upward import, an import cycle."""

from __future__ import annotations

import copy
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp
import pytest
from importlinter.configuration import configure
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract

configure()  # import-linter's own settings (its timer), as the lint-imports command makes them

CONTRACTS = {"layers": LayersContract, "acyclic_siblings": AcyclicSiblingsContract}
ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    session = {k: v for k, v in config.items() if k != "contracts"}
    return [
        CONTRACTS[c["type"]](c["name"], session, {k: v for k, v in c.items() if k not in ("name", "type")})
        for c in config["contracts"]
    ]


def _broken(graph: grimp.ImportGraph) -> list[str]:
    return [contract.name for contract in _contracts() if not contract.check(graph, verbose=False).kept]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("medmpc")


def test_the_package_keeps_its_contracts(graph):
    assert len(_contracts()) == 2
    assert _broken(graph) == []


@pytest.mark.parametrize(
    "importer,imported,breaks",
    [
        ("medmpc.mpc.transport", "medmpc.protocols.plan", "layers"),  # the engine reaching up to a protocol
        ("medmpc.training.local", "medmpc.protocols.plan", "layers"),
        ("medmpc.models.registry", "medmpc.imaging.images", "layers"),  # independent siblings
        ("medmpc.netlab.hosts", "medmpc.mpc.launch", "layers"),
        ("medmpc.serving.app", "medmpc.protocols.plan", "layers"),
        ("medmpc.protocols.plan", "medmpc.protocols.coordinator", "cycles"),  # coordinator imports plan
    ],
)
def test_a_new_upward_import_or_cycle_breaks_a_contract(graph, importer, imported, breaks):
    """Control: the same contracts on the real graph plus one forbidden import fail."""
    bad = copy.deepcopy(graph)
    bad.add_import(importer=importer, imported=imported)
    broken = _broken(bad)
    assert any(breaks in name for name in broken), broken


def test_only_the_medmpc_namespace_is_importable_from_outside_the_repository(tmp_path, monkeypatch):
    """The installed package is medmpc.*; the repository's folder names are not packages of their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    for name in ("mpc", "models", "imaging", "training", "protocols", "serving", "cli", "netlab"):
        sys.modules.pop(name, None)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
        assert importlib.import_module(f"medmpc.{name}").__name__ == f"medmpc.{name}"


def test_the_wheel_installs_only_the_medmpc_namespace(tmp_path):
    """`pip install .` puts medmpc/ (and its dist-info) into site-packages, nothing else: no
    generic top-level `mpc`, `models` or `cli` to collide with other distributions."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "runs", "__pycache__", "*.egg-info"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("medmpc-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names} == {"medmpc", wheel.name.split("-py")[0] + ".dist-info"}
    packages = {n.split("/")[1] for n in names if n.startswith("medmpc/")}
    assert packages == {"mpc", "models", "imaging", "training", "protocols", "serving", "cli", "netlab"}
    assert "medmpc/mpc/py.typed" in names and "medmpc/protocols/messages.py" in names
    assert "medmpc = medmpc.cli.main:main" in entry_points
