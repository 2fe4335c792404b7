"""`ruff check` and `mypy` (configured in pyproject.toml) as tests: the README's test command, which is
also CI's, runs them, so a clone gets the same verdict as CI with nothing else to remember."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_tool(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_ruff_check_is_clean():
    r = run_tool("ruff", "check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean():
    """adsa_core, server, loadtest and the tests' fake engine (pyproject's [tool.mypy] files); ~45 s cold on 2 cores."""
    r = run_tool("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no issues found" in r.stdout


@pytest.mark.parametrize(
    ("tool", "source", "finding"),
    [
        (("ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml")), "import os\n", "F401"),
        (("mypy", "--config-file", str(REPO / "pyproject.toml"), "--no-incremental"), "x: int = 'a'\n", "assignment"),
    ],
    ids=["ruff", "mypy"],
)
def test_each_checker_reports_a_planted_error(tmp_path, tool, source, finding):
    """The two checks above can fail: under the project's configuration each flags a known mistake."""
    (tmp_path / "planted.py").write_text(source)
    args = (*tool, "planted.py") if tool[0] == "ruff" else (*tool, "--cache-dir", str(tmp_path / "c"), "planted.py")
    r = run_tool(*args, cwd=tmp_path)
    assert r.returncode != 0 and finding in r.stdout, r.stdout + r.stderr
