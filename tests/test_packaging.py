"""Packaging: what `pip install .` builds and what `import mcp_redis` loads."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("modules", ["mcp_redis", "mcp_redis, mcp_redis.cli, mcp_redis.demo, mcp_redis.prometheus"])
def test_import_does_not_load_psycopg2_until_postgresql_is_used(modules: str) -> None:
    code = f"import sys; import {modules}; assert 'psycopg2' not in sys.modules, 'psycopg2 loaded'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_license_file_matches_setup_cfg() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_pyproject_declares_the_setuptools_build_backend() -> None:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(req.startswith("setuptools") for req in data["build-system"]["requires"])


@pytest.mark.long
def test_wheel_builds_without_setuptools_warnings_and_ships_lua_and_license(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build_log = proc.stdout + proc.stderr
    # pip's own notices about the package index are not the build's.
    build_lines = [line for line in build_log.splitlines() if "Location 'file://" not in line]
    assert not [line for line in build_lines if "warning" in line.lower()], build_log
    (wheel,) = tmp_path.glob("mcp_redis-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    lua = sorted(n for n in names if n.endswith(".lua"))
    assert lua == sorted(f"mcp_redis/lua/{p.name}" for p in (ROOT / "mcp_redis" / "lua").glob("*.lua"))
    assert "mcp_redis/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/")) or "__pycache__" in n for n in names)


TOOLING = ("mcp_redis.testing", "mcp_redis.demo")


def _imports(path: Path) -> set:  # type: ignore[type-arg]
    """Absolute names of the mcp_redis modules `path` imports (relative imports resolved)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("mcp_redis")}


def test_test_tooling_and_the_demo_live_in_subpackages_the_library_never_imports() -> None:
    package = ROOT / "mcp_redis"
    for old in ("testing.py", "topology.py", "faultproxy.py", "demo.py", "demo_worker.py"):
        assert not (package / old).exists(), f"mcp_redis/{old} belongs in mcp_redis/testing/ or mcp_redis/demo/"
    assert {p.name for p in (package / "testing").glob("*.py")} == {"__init__.py", "servers.py", "topology.py",
                                                                     "faultproxy.py", "tls.py"}
    assert {p.name for p in (package / "demo").glob("*.py")} == {"__init__.py", "worker.py"}
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.startswith(TOOLING) or module == "mcp_redis.cli":  # the CLI runs the demo
            continue
        uses = sorted(name for name in _imports(path) if name.startswith(TOOLING))
        assert not uses, f"{module} imports test tooling or the demo: {uses}"
