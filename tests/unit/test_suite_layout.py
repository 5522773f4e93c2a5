"""The suite's own layout: tests grouped by kind, helpers in tests/helpers, no test module importing another."""

from __future__ import annotations

import ast

from tests.helpers.paths import REPO

TESTS = REPO / "tests"
GROUPS = {"unit", "api", "cluster", "sim", "browser", "notebooks", "helpers"}


def _imported_modules(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_tests_live_in_their_groups():
    loose = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert loose == [], f"test modules outside tests/<group>/: {loose}"
    assert {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))} <= GROUPS


def test_no_test_module_imports_another():
    offenders = []
    for path in TESTS.rglob("*.py"):
        for mod in _imported_modules(path):
            if mod.startswith("tests.") and mod.rsplit(".", 1)[-1].startswith(("test_", "conftest")):
                offenders.append(f"{path.relative_to(REPO)} imports {mod}")
    assert offenders == []
