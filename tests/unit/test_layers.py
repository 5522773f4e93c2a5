"""The architecture as enforced: import-linter's contracts (pyproject.toml), a lazy package root
that loads no MLX, no private names imported across packages, ports and environment variables
read only through :mod:`exo_lab.defaults`."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration  # also configures import-linter (timer, readers)
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.private_modules import PrivateModulesContract

import exo_lab
from exo_lab import defaults

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "exo_lab"
CONTRACT_TYPES = {
    "layers": LayersContract,
    "acyclic_siblings": AcyclicSiblingsContract,
    "private_modules": PrivateModulesContract,
}


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def _contracts() -> list:
    """The contracts in pyproject.toml, as import-linter reads them."""
    config = read_configuration(str(REPO / "pyproject.toml"))
    return [
        CONTRACT_TYPES[spec["type"]](spec["name"], config["session_options"], spec)
        for spec in config["contracts_options"]
    ]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    assert exo_lab.__file__ == str(PACKAGE / "__init__.py"), "the graph must be of the package under test"
    return grimp.build_graph(
        "exo_lab", exclude_type_checking_imports=_config()["exclude_type_checking_imports"], cache_dir=None
    )


def test_import_linter_contracts_are_kept(graph):
    for contract in _contracts():
        check = contract.check(graph, verbose=False)
        assert check.kept, f"{contract.name} is broken: {contract.render_broken_contract(check) or check.metadata}"


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("exo_lab.models.card", "exo_lab.cluster.topology"),  # a lower layer reaching up
        ("exo_lab.cluster.topology", "exo_lab.ui.topology_widget"),  # the display hook the data class used to import
        ("exo_lab.engine.chat", "exo_lab.placement.plan"),  # siblings must stay independent
        ("exo_lab.defaults", "exo_lab.paths"),
    ],
)
def test_the_layers_contract_catches_an_upward_import(graph, importer, imported):
    graph = grimp.build_graph("exo_lab", exclude_type_checking_imports=True, cache_dir=None)
    graph.add_import(importer=importer, imported=imported)
    layers = next(c for c in _contracts() if isinstance(c, LayersContract))
    assert not layers.check(graph, verbose=False).kept


def test_the_acyclic_contract_catches_a_cycle():
    graph = grimp.build_graph("exo_lab", exclude_type_checking_imports=True, cache_dir=None)
    graph.add_import(importer="exo_lab.bench.metrics", imported="exo_lab.bench.results")  # results imports metrics
    acyclic = next(c for c in _contracts() if isinstance(c, AcyclicSiblingsContract))
    assert not acyclic.check(graph, verbose=False).kept


def test_lint_imports_command_passes():
    """What `make test` enforces, through the command a developer runs by hand."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


# --------------------------------------------------------------------------- the lazy root

LIGHT_IMPORTS = [
    "exo_lab",
    "exo_lab.sim",
    "exo_lab.jupyter",
    "exo_lab.cluster",
    "exo_lab.cluster.client",
    "exo_lab.cluster.agent",
    "exo_lab.jupyter.handlers",
    "exo_lab.cli",
    "exo_lab.placement",
]


def _loaded_after(module: str) -> dict:
    code = (
        "import importlib, json, sys; importlib.import_module(%r); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'exo_lab'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code % module],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT_IMPORTS)
def test_importing_loads_no_mlx(module):
    loaded = _loaded_after(module)
    assert not [m for m in loaded if m.split(".")[0] in ("mlx", "mlx_lm")], f"{module} loads MLX"


def test_the_root_imports_only_blas_version_and_defaults():
    """And what loading the BLAS needs: the native kernel's builder and the cache paths (no MLX, no numpy)."""
    assert set(_loaded_after("exo_lab")) == {
        "exo_lab",
        "exo_lab._blas",
        "exo_lab._version",
        "exo_lab.defaults",
        "exo_lab.native",
        "exo_lab.paths",
    }


def test_public_names_resolve_on_first_use():
    from exo_lab.api.server import Server, serve
    from exo_lab.cluster.client import ClusterError
    from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
    from exo_lab.engine.generator import Engine
    from exo_lab.models import ModelCard, resolve
    from exo_lab.workbench import Cluster, connect, discover, local_cluster

    expected = {
        "Cluster": Cluster,
        "ClusterError": ClusterError,
        "Engine": Engine,
        "LinkProfile": LinkProfile,
        "ModelCard": ModelCard,
        "NodeInfo": NodeInfo,
        "Server": Server,
        "Topology": Topology,
        "connect": connect,
        "discover": discover,
        "local_cluster": local_cluster,
        "resolve": resolve,
        "serve": serve,
    }
    assert sorted([*expected, "__version__"]) == sorted(exo_lab.__all__)
    for name, value in expected.items():
        assert getattr(exo_lab, name) is value
        assert name in dir(exo_lab)
    from exo_lab._version import __version__

    assert exo_lab.__version__ == __version__
    with pytest.raises(AttributeError, match="no attribute 'Clusterr'"):
        exo_lab.Clusterr  # noqa: B018


def test_hatch_reads_the_version_from_its_module():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "exo_lab/_version.py"


def test_openblas_is_loaded_before_mlx_by_a_plain_import():
    code = (
        "import exo_lab, sys; assert 'mlx.core' not in sys.modules; from exo_lab import _blas; "
        "import mlx.core; print(_blas.find_openblas() is None or _blas.in_use())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "True"


# --------------------------------------------------------------------------- source rules


def _sources() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((".".join(parts), path, ast.parse(path.read_text())))
    return out


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_private_names_are_imported_across_packages():
    found = []
    for module, path, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("exo_lab")
                and not node.level
            ):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    target = f"{node.module}.{alias.name}"
                    is_module = (PACKAGE.parent / (target.replace(".", "/") + ".py")).exists()
                    if private and not is_module and _top(node.module) != _top(module):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not found, "\n".join(found)


# Files other helpers own in this round; the lead moves their reads to exo_lab.defaults after merging.
PENDING: set[str] = set()


def _code_strings(tree: ast.Module) -> list[ast.Constant]:
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings]


def test_environment_variables_and_ports_are_read_only_through_defaults():
    names = set(defaults.VARIABLES)
    ports = {defaults.API_PORT, defaults.AGENT_PORT, defaults.PROBE_PORT, defaults.DASHBOARD_PORT}
    found = []
    for _module, path, tree in _sources():
        rel = str(path.relative_to(REPO))
        if rel == "exo_lab/defaults.py" or rel in PENDING:
            continue
        for node in _code_strings(tree):
            if isinstance(node.value, str) and re.fullmatch(r"EXO_LAB_[A-Z_]+", node.value):
                found.append(f"{rel}:{node.lineno} names {node.value}")
            if isinstance(node.value, int) and not isinstance(node.value, bool) and node.value in ports:
                found.append(f"{rel}:{node.lineno} hard-codes port {node.value}")
    assert not found, "\n".join(found)
    assert len(names) == 21 and all(n.startswith("EXO_LAB_") for n in names)


def test_every_variable_has_an_accessor(monkeypatch):
    accessors = {
        defaults.CLUSTER_KEY: defaults.cluster_key,
        defaults.API_KEY: defaults.api_key,
        defaults.CACHE_DIR: defaults.cache_dir,
        defaults.MODELS_DIR: defaults.models_dir,
        defaults.RUNTIME_DIR: defaults.runtime_dir,
        defaults.STATE_DIR: defaults.state_dir,
        defaults.DASHBOARD_BENCH: defaults.dashboard_bench,
        defaults.DASHBOARD_URL: defaults.dashboard_url,
        defaults.SIM: defaults.sim,
        defaults.SIM_HOST: defaults.sim_host,
        defaults.SIM_RUN_DIR: defaults.sim_run_dir,
    }
    for name, read in accessors.items():
        monkeypatch.setenv(name, "x-value")
        assert read() == "x-value"
        monkeypatch.setenv(name, "")
        assert read() is None  # set but empty means unset
        assert read({name: "y"}) == "y"  # a child's environment
    monkeypatch.setenv(defaults.DASHBOARD_CONNECT, "a:1, b:2,")
    assert defaults.dashboard_connect() == ["a:1", "b:2"]
    monkeypatch.delenv(defaults.BLAS, raising=False)
    assert defaults.blas() == "openblas" and defaults.blas({defaults.BLAS: "Reference"}) == "reference"
    monkeypatch.setenv(defaults.WORKER_LOG, "debug")
    assert defaults.worker_log_level() == "DEBUG"
    monkeypatch.delenv(defaults.PEER_LINK, raising=False)
    assert defaults.peer_link() and not defaults.peer_link({defaults.PEER_LINK: "0"})


def test_in_an_ipython_shell_the_package_registers_the_widget_displays():
    code = (
        "from IPython.core.interactiveshell import InteractiveShell; shell = InteractiveShell.instance(); "
        "import exo_lab, sys; assert 'mlx' not in sys.modules; "
        "print(sorted(shell.display_formatter.mimebundle_formatter.deferred_printers))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(
        [
            ("exo_lab.cluster.topology", "Topology"),
            ("exo_lab.engine.trace", "Trace"),
            ("exo_lab.instance", "Instance"),
            ("exo_lab.placement.plan", "Plans"),
        ]
    )


def test_the_command_line_parses_without_mlx():
    """`exo-lab node` (every node agent) and `exo-lab sim` start without loading MLX."""
    code = (
        "import sys; from exo_lab.cli import build_parser; "
        "build_parser().parse_args(['node', '--no-mdns']); build_parser().parse_args(['sim', 'status']); "
        "print([m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
