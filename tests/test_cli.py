"""``celerybridge check`` and ``celerybridge contracts``, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI_SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"


def run(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m celerybridge *args`` as a shell runs it, ``extra_path`` importable too.
    No PUSHER_* settings: the tools must not need the worker's runtime settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHER_", "CELERYBRIDGE_"))}
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{ROOT}"
    return subprocess.run(
        [sys.executable, "-m", "celerybridge", *args],
        cwd=ROOT,
        env=env,
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
    assert lines[0] == (
        "UNCHECKED cli.drift v1 (cli.drift, queue cli): return: v1 has no return annotation: "
        "cannot compare"
    )
    assert lines[1].startswith(
        "MISMATCH  cli.drift v2 (cli.drift_v2, queue cli): v2(key, content, "
    )
    assert (
        "cannot take the arguments of (key: str, content: str, meta: dict[str, str]) -> None "
        in (lines[1])
    )
    assert "by keyword" in lines[1]


def test_check_reports_missing_versions() -> None:
    result = run("check", "tests.workers.bridge_worker")
    assert result.returncode == 1
    assert "ok        calc.add v1 (calc.add, queue cb-test)" in result.stdout
    assert (
        "MISSING   plain.store v1 (plain.store, queue cb-test): no implementation" in result.stdout
    )
    assert run("check", "--allow-missing", "tests.workers.bridge_worker").returncode == 0


def test_check_fails_when_it_finds_no_contract_or_no_implementation() -> None:
    nothing = run("check", "tests.cli_modules")
    assert nothing.returncode == 1
    assert nothing.stdout == ""
    assert nothing.stderr == (
        "Error: no contract found in tests.cli_modules; name the bindings module(s) that "
        "declare them, or a worker module that imports them\n"
    )
    bindings_only = run("check", "--allow-missing", "pusher.bindings")
    assert bindings_only.returncode == 1
    assert bindings_only.stderr == (
        "Error: no implementation found in pusher.bindings; name the worker's module or app "
        "too (as for celery -A)\n"
    )


def test_check_finds_the_pusher_app_as_celery_a_does_without_its_settings() -> None:
    result = run("check", "pusher")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"ok        pusher.send_to_s3 v{v} ({wire}, queue pusher)"
        for v, wire in [
            (1, "pusher.send_to_s3"),
            (2, "pusher.send_to_s3_v2"),
            (3, "pusher.send_to_s3_v3"),
        ]
    ]


def test_check_compares_parameter_and_return_types() -> None:
    result = run("check", "tests.cli_modules.typed")
    assert result.returncode == 1
    store = "cli.typed.store v1 (cli.typed.store, queue cli)"
    assert result.stdout.splitlines() == [
        "ok        cli.typed.mode v1 (cli.typed.mode, queue cli)",
        f"MISMATCH  {store}: parameter 'key': the contract sends str, store_impl takes int "
        "(string is not integer)",
        f"MISMATCH  {store}: parameter 'content': the contract sends str, store_impl takes "
        "bytes (string is not base64 string)",
        f"MISMATCH  {store}: parameter 'meta': the contract sends dict[str, str], store_impl "
        "takes list[int] (object of string is not array of integer)",
        f"MISMATCH  {store}: return: the contract promises Receipt, store_impl returns str "
        "(string is not object Receipt)",
        "MISMATCH  cli.typed.store v2 (cli.typed.store_v2, queue cli): parameter 'meta': the "
        "contract sends dict[str, str] | None, plain_store_v2 takes dict[str, str] "
        "(null is not object of string)",
    ]


def test_check_says_what_it_cannot_compare_and_fails_on_it_with_strict() -> None:
    line = (
        "UNCHECKED cli.untyped v1 (cli.untyped, queue cli): return: plain has no return "
        "annotation: cannot compare"
    )
    lenient = run("check", "tests.cli_modules.untyped")
    assert (lenient.returncode, lenient.stdout.splitlines()) == (0, [line])
    strict = run("check", "--strict", "tests.cli_modules.untyped")
    assert (strict.returncode, strict.stdout.splitlines()) == (1, [line])


def test_check_reports_an_unimportable_module() -> None:
    result = run("check", "tests.cli_modules.nope")
    assert result.returncode == 1
    assert "cannot import tests.cli_modules.nope" in result.stderr


def test_contracts_prints_json_schema_as_calls_travel() -> None:
    result = run("contracts", "tests.cli_modules.good", "pusher.bindings")
    assert result.returncode == 0, result.stderr
    contracts = json.loads(result.stdout)
    assert [(c["name"], c["version"], c["wire_name"], c["default"]) for c in contracts] == [
        ("cli.add", 1, "cli.add", True),
        ("cli.add", 2, "cli.add_v2", False),
        ("pusher.send_to_s3", 1, "pusher.send_to_s3", True),
        ("pusher.send_to_s3", 2, "pusher.send_to_s3_v2", False),
        ("pusher.send_to_s3", 3, "pusher.send_to_s3_v3", False),
    ]
    dialect = "https://json-schema.org/draft/2020-12/schema"
    assert contracts[1]["args"] == {
        "$schema": dialect,
        "title": "cli.add v2 args",
        "type": "array",
        "prefixItems": [{"title": name, "type": "integer"} for name in "xyz"],
        "minItems": 3,
        "maxItems": 3,
    }
    assert contracts[1]["kwargs"] == {
        "$schema": dialect,
        "title": "cli.add v2 kwargs",
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    assert contracts[0]["returns"] == {"$schema": dialect, "type": "integer"}
    v3 = contracts[4]["args"]
    assert (v3["minItems"], v3["maxItems"]) == (2, 5)
    assert v3["prefixItems"][1] == {
        "title": "content",
        "type": "string",
        "contentEncoding": "base64",
    }
    assert v3["prefixItems"][3]["default"] == "application/octet-stream"
    for schema in (v3, contracts[4]["kwargs"], contracts[4]["returns"]):
        jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(["items/1.json", "aGk=", None, "text/plain", 3], v3)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([b"items/1.json".hex(), 1], v3)


def _asyncapi_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema)


def test_contracts_as_asyncapi_validates_against_the_asyncapi_3_schema() -> None:
    result = run("contracts", "--format", "asyncapi", "--title", "pusher", "pusher.bindings")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    errors = sorted(_asyncapi_validator().iter_errors(document), key=str)
    assert not errors, "\n".join(e.message[:300] for e in errors[:5])
    assert document["asyncapi"] == "3.0.0"
    assert list(document["channels"]) == ["pusher"]
    assert document["channels"]["pusher"]["address"] == "pusher"
    messages = document["components"]["messages"]
    assert sorted(messages) == [
        "pusher.send_to_s3",
        "pusher.send_to_s3_v2",
        "pusher.send_to_s3_v3",
    ]
    v3 = messages["pusher.send_to_s3_v3"]
    assert v3["headers"]["properties"]["task"] == {
        "type": "string",
        "const": "pusher.send_to_s3_v3",
    }
    args, kwargs, _embed = v3["payload"]["items"]
    assert kwargs == {
        "title": "pusher.send_to_s3 v3 kwargs",
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    assert args["items"][1] == {"title": "content", "type": "string", "contentEncoding": "base64"}
    returns = v3["x-celerybridge-returns"]
    assert (returns["title"], returns["type"], returns["properties"]["size"]) == (
        "Receipt",
        "object",
        {"title": "Size", "type": "integer"},
    )
    # The payload schema describes a real message body: Celery protocol 2, as sent.
    body = [["items/1.json", "aGk=", None, "application/octet-stream", None], {}, {}]
    payload = {**v3["payload"], "components": document["components"]}
    jsonschema.Draft7Validator(payload).validate(body)


def test_an_invalid_asyncapi_document_fails_the_validation() -> None:
    # The validation above can fail: a document missing what AsyncAPI requires does.
    broken = {"asyncapi": "3.0.0", "info": {"title": "x"}, "channels": {"q": {"address": 1}}}
    assert len(list(_asyncapi_validator().iter_errors(broken))) >= 2
