"""The documentation stays true to the tree: every relative link in README.md and docs/ resolves (to a
file, and to a heading where it names one), and every `launch/*.py` a document names exists and answers
`--help`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCRIPT = re.compile(r"\blaunch/([a-z_]+\.py)\b")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not this test's business
            continue
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not broken, broken


def test_every_named_launch_script_exists_and_answers_help():
    named = sorted({name for doc in DOCUMENTS for name in SCRIPT.findall(doc.read_text())})
    assert "train.py" in named and "doctor.py" in named
    missing = [name for name in named if not (ROOT / "launch" / name).is_file()]
    assert not missing, missing
    # Started together: each is mostly its imports, and two cores overlap them.
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / name), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in named
    }
    silent = []
    for name, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        if proc.returncode != 0 or "usage" not in output.lower() and name != "launch.py":
            silent.append(f"{name}: exit {proc.returncode}: {output[-300:]}")
    assert not silent, silent
