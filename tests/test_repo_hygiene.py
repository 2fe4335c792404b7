"""A clone is self-contained: nothing reads the `shared/` folder that sits beside the checkout on the
developers' and CI's machines (a user's clone has none), and the test vectors are intact."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO / "tests" / "data" / "llamagen"

# The ways code has named the sibling folder: a "<up>/shared" path, '"<up>" / "shared"', '"<up>", "shared"'
# and 'X.parent / "shared"' (<up> being the parent directory's two dots). This file names them only in
# that spelled-out form, and the scan skips it.
_DOTS, _NAME = re.escape(".."), "shared"
SIBLING_SHARED = re.compile(
    rf"{_DOTS}[\"']?\s*[/,\\]\s*[\"']?{_NAME}\b|\.parents?(\[\d+\])?\s*/\s*[\"']{_NAME}[\"']"
)
# in Markdown a mention of where data came from is fine, a link into the sibling folder is not
MARKDOWN_LINK = re.compile(rf"\]\(\s*(\./)?{_DOTS}/{_NAME}\b")


def tracked_files() -> list[Path]:
    """The files a clone has: `git ls-files`, or every file outside dot-folders and build output
    when this is not a git checkout (an unpacked source archive)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        return [REPO / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
            files += [Path(root) / n for n in names]
        return files


def references_to_shared(files: list[Path], root: Path = REPO) -> list[str]:
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary (checkpoints, images) or deleted in the work tree
        pattern = MARKDOWN_LINK if path.suffix == ".md" else SIBLING_SHARED
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return found


def test_no_file_reads_the_sibling_shared_folder():
    files = tracked_files()
    assert REPO / "tests" / "conftest.py" in files  # the listing really is this repository
    assert references_to_shared([f for f in files if f != Path(__file__).resolve()]) == []


@pytest.mark.parametrize(
    ("text", "suffix", "hit"),
    [
        ('TESTDATA = "<up>/shared/testdata/llamagen"', ".py", True),
        ('Path(__file__).parents[1] / "<up>" / "shared" / "testdata"', ".py", True),
        ('os.path.join(REPO, "<up>", "shared", "x")', ".py", True),
        ('TESTDATA = REPO.parent / "shared" / "testdata"', ".py", True),
        ('VQ="$REPO/<up>/shared/testdata/llamagen/vq.pt"', ".sh", True),
        ("see [the design](<up>/shared/DESIGN.md)", ".md", True),
        ("copied from the project's <up>/shared folder", ".md", False),  # a mention, not a link
        ("shared_memory = 1; a shared pool; sharedfoo", ".py", False),
        ('DATA = REPO / "tests" / "data" / "llamagen"', ".py", False),
    ],
)
def test_the_detector_sees_each_way_of_naming_the_folder(tmp_path, text, suffix, hit):
    f = tmp_path / f"sample{suffix}"
    f.write_text(text.replace("<up>", "..") + "\n")
    assert bool(references_to_shared([f], tmp_path)) == hit


def test_test_vectors_are_in_the_repository_and_intact():
    sums = (TESTDATA / "SHA256SUMS").read_text().split("\n")
    expected = dict(reversed(line.split("  ", 1)) for line in sums if line.strip())
    # every data file is pinned, and each one the tests load is among them
    assert {p.name for p in TESTDATA.iterdir()} - {"README.md", "SHA256SUMS"} == set(expected)
    assert {"MANIFEST.json", "c2i_gpt.pt", "c2i_io.pt", "t2i_gpt.pt", "t2i_io.pt", "vq.pt", "vq_io.pt"} <= set(expected)
    actual = {name: hashlib.sha256((TESTDATA / name).read_bytes()).hexdigest() for name in expected}
    assert actual == expected
