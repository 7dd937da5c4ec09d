"""The code shown in the docs is real: every example runs, every included snippet exists.

Each example runs in its own interpreter, as a reader would run it: contracts register in a
process-wide registry, and the examples share theirs (they import docs/examples/bindings.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
PAGES = sorted(DOCS.glob("**/*.md"))

# pymdownx.snippets: --8<-- "path" or --8<-- "path:section", path relative to the repository root.
SNIPPET = re.compile(r'^\s*-{1,}8<-{1,}\s+"(?P<path>[^":]+)(?::(?P<section>[^"]+))?"\s*$')


def snippets() -> list[tuple[str, str, str | None]]:
    """(page, path, section) for every snippet line in the docs pages."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            match = SNIPPET.match(line)
            if match:
                found.append((page.name, match["path"], match["section"]))
    return found


def test_there_is_something_to_check() -> None:
    assert len(EXAMPLES) >= 5
    assert len(snippets()) >= 10


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(example: Path) -> None:
    # A clean environment: the examples say what they configure; none needs a broker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERYBRIDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-W", "error", str(example.relative_to(ROOT))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, f"{example.name} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize(
    ("page", "path", "section"), snippets(), ids=[f"{p}:{s or f}" for p, f, s in snippets()]
)
def test_snippet_exists(page: str, path: str, section: str | None) -> None:
    source = ROOT / path
    assert source.is_file(), f"{page} includes {path}, which does not exist"
    if section is not None:
        text = source.read_text()
        for marker in (f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"):
            assert marker in text, f"{page} includes {path}:{section}; {marker!r} is missing"


def test_every_example_is_shown() -> None:
    shown = {path for _, path, _ in snippets()}
    missing = [e.name for e in EXAMPLES if str(e.relative_to(ROOT)) not in shown]
    assert not missing, f"examples no page includes: {missing}"
