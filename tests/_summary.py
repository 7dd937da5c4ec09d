"""Sections printed at the end of a test run (the fault suite's ledger, the fuzz figures).

Under pytest-xdist tests run in worker processes while the controller prints the
summary: a section's lines go to a file in a folder the controller names
(``CELERYBRIDGE_TEST_SUMMARY_DIR``, set before the workers start, which inherit it) and
the controller prints them once everything has run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

FOLDER = "CELERYBRIDGE_TEST_SUMMARY_DIR"


def add(section: str, text: str, *, header: str | None = None) -> None:
    """Add ``text`` (one or more lines) to ``section``; ``header`` heads the section."""
    folder = os.environ.get(FOLDER)
    if folder is None:  # a process pytest did not start (a worker subprocess)
        return
    path = Path(folder, f"{section}.txt")
    if header is not None:
        Path(folder, f"{section}.header").write_text(header + "\n")
    with path.open("a") as out:  # appends of a few lines from two processes interleave whole
        out.write(text.rstrip("\n") + "\n")


def start(config: Any) -> None:
    """In the process that prints the summary (pytest's, or xdist's controller)."""
    if hasattr(config, "workerinput"):  # an xdist worker: it inherited the folder
        return
    os.environ[FOLDER] = tempfile.mkdtemp(prefix="celerybridge-summary-")


def write(terminalreporter: Any) -> None:
    """Print every section, then forget them."""
    if hasattr(terminalreporter.config, "workerinput"):
        return
    folder = os.environ.get(FOLDER)
    if folder is None:
        return
    for path in sorted(Path(folder).glob("*.txt")):
        terminalreporter.section(path.stem)
        header = path.with_suffix(".header")
        if header.exists():
            terminalreporter.write(header.read_text())
        terminalreporter.write(path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
