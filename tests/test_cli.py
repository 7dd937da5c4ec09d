"""``celerybridge check`` and ``celerybridge contracts``, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celerybridge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_for_compatible_implementations() -> None:
    result = run("check", "tests.cli_modules.good")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok        cli.add v1 (cli.add, queue cli)",
        "ok        cli.add v2 (cli.add_v2, queue cli)",
    ]


def test_check_fails_on_a_drifted_plain_task() -> None:
    result = run("check", "tests.cli_modules.drifted")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "ok        cli.drift v1 (cli.drift, queue cli)"
    assert lines[1].startswith(
        "MISMATCH  cli.drift v2 (cli.drift_v2, queue cli): v2(key, content, "
    )
    assert (
        "cannot take the arguments of (key: str, content: str, meta: dict[str, str]) -> None "
        in (lines[1])
    )
    assert "by keyword" in lines[1]


def test_check_reports_missing_versions() -> None:
    result = run("check", "tests.workers.bindings")
    assert result.returncode == 1
    assert "MISSING   calc.add v1 (calc.add, queue cb-test): no implementation" in result.stdout
    assert run("check", "--allow-missing", "tests.workers.bindings").returncode == 0


def test_check_reports_an_unimportable_module() -> None:
    result = run("check", "tests.cli_modules.nope")
    assert result.returncode == 1
    assert "cannot import tests.cli_modules.nope" in result.stderr


def test_contracts_prints_json_schema() -> None:
    result = run("contracts", "tests.cli_modules.good")
    assert result.returncode == 0, result.stderr
    contracts = json.loads(result.stdout)
    assert [(c["name"], c["version"], c["wire_name"], c["default"]) for c in contracts] == [
        ("cli.add", 1, "cli.add", True),
        ("cli.add", 2, "cli.add_v2", False),
    ]
    arguments = contracts[1]["arguments"]
    assert arguments["required"] == ["x", "y", "z"]
    assert arguments["properties"]["z"] == {"title": "Z", "type": "integer"}
    assert contracts[0]["returns"] == {"type": "integer"}
