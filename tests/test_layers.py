"""The layers import one way: api -> domain -> core and worker -> domain -> core; api and worker
never import each other, and nothing the worker imports pulls in the web framework."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = {"fastapi", "starlette"}
FORBIDDEN = {
    "api": {"worker"},
    "worker": {"api"} | WEB,
    # the worker imports domain, so domain stays free of the web framework too
    "domain": {"api", "worker"} | WEB,
    "core": {"api", "worker", "domain"} | WEB,
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            modules.add(".".join([*base, *([node.module] if node.module else [])]))
    return modules


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if module.split(".")[0] in FORBIDDEN[layer]:
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer: str) -> None:
    assert (ROOT / layer).is_dir()
    assert violations(layer) == []


def test_the_walker_sees_imports_inside_functions() -> None:
    # api/cli.py imports the app inside a function; a walker blind to that would pass anything
    assert "api.app" in imported_modules(ROOT / "api" / "cli.py")


def test_the_worker_process_loads_no_web_framework(tmp_path: Path) -> None:
    env = os.environ | {"IDAP_DATA_DIR": str(tmp_path), "IDAP_BROKER_URL": "memory://", "OMP_NUM_THREADS": "1"}
    script = "import sys, worker.tasks; print(sorted({name.split('.')[0] for name in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert set(ast.literal_eval(out)) & (WEB | {"api"}) == set()
