"""The README's commands do what it says: ``scripts/test --unit`` needs no broker or browser."""

from __future__ import annotations

import os
import subprocess

import pytest

from ._workers import ROOT

ONE_TEST = "tests/test_docs.py::test_there_is_something_to_check"


@pytest.mark.parametrize("selection", [["--unit"], ["-m", "not integration"]])
def test_unit_tests_only_check_no_broker_and_no_browser(selection: list[str]) -> None:
    done = subprocess.run(
        ["./scripts/test", *selection, ONE_TEST, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "==> unit tests only: no brokers, no browser" in done.stdout
    assert "==> brokers" not in done.stdout  # ensure-brokers never ran
    assert "chromium" not in done.stdout
    assert "1 passed" in done.stdout
