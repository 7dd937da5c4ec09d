"""The code shown in the docs is real: every example runs, every included snippet exists.

Each example runs in its own interpreter, as a reader would run it: contracts register in a
process-wide registry, and the examples share theirs (they import docs/examples/bindings.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from examples.fastapi_app.models import BackupOut, ItemOut

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


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` as the README says, into ``site``."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_the_docs_build_strict(tmp_path: Path) -> None:
    # mkdocs.yml validates every link and anchor; in strict mode a warning fails the build.
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "quickstart" / "index.html").is_file()


def test_a_broken_link_fails_the_docs_build(tmp_path: Path) -> None:
    # The check above can fail: the same build, with one page linking to a missing one.
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](nowhere.md)\n")
    config = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(config)
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "nowhere.md" in done.stderr


def quickstart_json() -> list[dict[str, object]]:
    """Each line of the quickstart's ```json blocks, parsed."""
    blocks = re.findall(r"^```json\n(.*?)^```", (DOCS / "quickstart.md").read_text(), re.M | re.S)
    return [json.loads(line) for block in blocks for line in block.splitlines()]


def test_the_quickstart_answers_are_complete() -> None:
    # Each sample as the API would answer it, every field there: a missing one (as "written"
    # once was) fails here; tests/fastapi_app/test_demo.py compares them with a real run.
    samples = quickstart_json()
    assert len(samples) >= 4
    for sample in samples:
        model = BackupOut if "state" in sample else ItemOut
        assert model.model_validate(sample).model_dump(mode="json") == sample
    receipts = [s["receipt"] for s in samples if isinstance(s.get("receipt"), dict)]
    assert receipts
    assert all(receipt["written"] is True for receipt in receipts)


def _fast_path_table() -> list[str]:
    """The rows of docs/delegation.md's table of the fast path beside Celery's client."""
    page = (ROOT / "docs" / "delegation.md").read_text()
    section = page.split("## The fast path beside Celery's client", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def test_each_row_of_the_fast_path_table_names_tests_that_exist() -> None:
    rows = _fast_path_table()[1:]  # after the heading row
    assert len(rows) >= 10
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row.rsplit("|", 2)[1])
        assert cited, f"a row without a test: {row[:60]}"
        for path, name in cited:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), (path, name)


def test_the_settings_docstring_names_every_variable() -> None:
    """``BridgeSettings``' docstring lists the environment variables: all of them."""
    from celerybridge import BridgeSettings

    doc = " ".join((BridgeSettings.__doc__ or "").split())
    missing = [
        f"CELERYBRIDGE_{name.upper()}"
        for name in BridgeSettings.model_fields
        if f"``CELERYBRIDGE_{name.upper()}``" not in doc
    ]
    assert missing == []
