"""The README's two commands are the contract: CI runs command 2 exactly, and command 1 installs every
package that the programs it names (`adsa-serve`, `python -m loadtest`) import."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
OWN_PACKAGES = {"adsa_core", "server", "loadtest"}


def readme_commands() -> tuple[str, str]:
    """The first command line of the README's first two bash blocks (1: serve, 2: test)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    first = [next(line for line in b.splitlines() if line.strip() and not line.startswith("#")) for b in blocks[:2]]
    return first[0], first[1]


def installed_closure(extras: set[str]) -> set[str]:
    """Canonical names of adsa-serve's requirements with `extras`, and theirs, transitively."""

    def wanted(req: Requirement, extra: str) -> bool:
        return req.marker is None or req.marker.evaluate({"extra": extra})

    todo = [
        Requirement(r)
        for r in metadata.requires("adsa-serve") or []
        if any(wanted(Requirement(r), e) for e in {"", *extras})
    ]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name == "adsa-serve":
            continue
        seen.add(name)
        for r in metadata.requires(req.name) or []:
            sub = Requirement(r)
            if any(wanted(sub, e) for e in {"", *req.extras}):
                todo.append(sub)
    return seen


def third_party_imports(*packages: str) -> dict[str, str]:
    """{top-level module: a file importing it} over the packages' sources (absolute imports only)."""
    found: dict[str, str] = {}
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - OWN_PACKAGES - set(sys.stdlib_module_names):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert "pytest" in test_command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]


def test_the_serve_command_installs_what_the_server_and_the_load_tester_import():
    serve_command, _ = readme_commands()
    assert serve_command.endswith("&& adsa-serve")
    extras = set(re.search(r"pip install -e '\.\[([\w,]+)\]'", serve_command).group(1).split(","))
    closure = installed_closure(extras)
    providers = metadata.packages_distributions()
    imports = third_party_imports("server", "loadtest")
    assert {"fastapi", "uvicorn", "httpx"} <= set(imports)  # the scan sees real imports
    missing = {
        module: where
        for module, where in imports.items()
        if not {canonicalize_name(d) for d in providers.get(module, [module])} & closure
    }
    assert missing == {}, f"README command 1 installs extras {sorted(extras)}, which leave these imports out"


def test_a_serve_command_without_the_loadtest_extra_is_caught():
    """The check above can fail: the README's old `.[server]` left the load tester's httpx out."""
    closure = installed_closure({"server"})
    assert "fastapi" in closure and "matplotlib" not in closure
