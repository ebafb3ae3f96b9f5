"""The layers import one way (README, Architecture): api and worker -> domain -> core, api and worker
never import each other, core's parts form layers, and no package has an import cycle.

The rules are the import-linter contracts in pyproject.toml (CI runs `lint-imports` too); these
tests hold them in the suite, and check what a static graph cannot: what a worker process loads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_the_import_contracts_hold() -> None:
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_graph_sees_imports_inside_functions() -> None:
    # api/cli.py imports the app inside a function; a graph blind to that would let anything pass
    graph = grimp.build_graph("api", cache_dir=None)
    assert graph.direct_import_exists(importer="api.cli", imported="api.app")


def test_the_worker_process_loads_no_web_framework(tmp_path: Path) -> None:
    env = os.environ | {"IDAP_DATA_DIR": str(tmp_path), "IDAP_BROKER_URL": "memory://", "OMP_NUM_THREADS": "1"}
    script = "import sys, worker.tasks; print(sorted({name.split('.')[0] for name in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert set(ast.literal_eval(out)) & {"fastapi", "starlette", "api"} == set()
