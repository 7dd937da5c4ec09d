"""Red team: `celerybridge check`, `contracts` and `call` (branch cli-contracts), and the
pusher's settings read at worker start.

Every test here asserts what the docs promise (docs/cli.md) or what a user would need;
each failure is a finding.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import TypedDict

from celerybridge import remote_task
from celerybridge._asyncapi import document
from celerybridge._check import check_implementation
from celerybridge._cli import main
from celerybridge._compat import subset
from celerybridge._registry import registry
from celerybridge._schema import _adapter, describe, type_schema
from tests.workers import bindings  # noqa: F401  (registers calc.*)

from .._brokers import BROKERS, RESULT_BACKEND, purge, queue_length
from ..test_cli import run as cli

ROOT = Path(__file__).resolve().parents[2]
MODULES = Path(__file__).parent / "modules"
ASYNCAPI_SCHEMA = ROOT / "tests" / "asyncapi" / "asyncapi-3.0.0.json"


# --------------------------------------------------------------------------------------
# check: the type comparison (celerybridge._compat)
# --------------------------------------------------------------------------------------


class Node(BaseModel):
    value: int
    children: list[Node] = []


class Tree(BaseModel):
    value: int
    children: list[Tree] = []
    label: str | None = None


def test_compat_two_different_recursive_models_do_not_crash() -> None:
    # _Comparison's coinduction keys on id() of dicts _resolve copies afresh on every
    # call: the assumption never matches and the comparison recurses without end.
    assert subset(type_schema(Node), type_schema(Tree)).ok is True
    assert subset(type_schema(Tree), type_schema(Node)).ok is True  # Node ignores `label`


def test_check_cli_on_recursive_models_says_something_instead_of_a_traceback() -> None:
    result = cli("check", "tests.redteam.modules.recursive")
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    assert "RecursionError" not in result.stderr
    assert result.returncode == 0, result.stderr[-600:]
    assert result.stdout.splitlines() == ["ok        rt.tree v1 (rt.tree, queue rt)"]


class Colour(enum.Enum):  # a plain Enum: its members are not str
    RED = "red"
    BLUE = "blue"


class Receipt(BaseModel):
    key: str
    size: int


# The implementation receives the contract's *Python* values (the worker validates with
# the contract's annotations and passes those on). docs/cli.md: "A format or encoding
# must be the same on both sides, since it decides the Python type the implementation
# receives". These pairs have equal JSON Schemas but different Python types: `check`
# says `ok` for an implementation that gets an object it was not written for.
PYTHON_MISMATCHES = [
    pytest.param(Receipt, dict[str, Any], id="model-sent-dict-taken"),
    pytest.param(Colour, str, id="plain-enum-sent-str-taken"),
    pytest.param(tuple[int, int], list[int], id="tuple-sent-list-taken"),
    pytest.param(set[int], list[int], id="set-sent-list-taken"),
    pytest.param(float, Decimal, id="float-sent-decimal-taken"),
    pytest.param(dict[str, int], dict[int, int], id="str-keys-sent-int-keys-taken"),
    pytest.param(dict[int, int], dict[str, int], id="int-keys-sent-str-keys-taken"),
]


@pytest.mark.parametrize(("sent", "taken"), PYTHON_MISMATCHES)
def test_check_is_not_ok_when_the_implementation_receives_another_python_type(
    sent: Any, taken: Any
) -> None:
    def declared(value):  # type: ignore[no-untyped-def]  # annotated below (no PEP 563 strings)
        ...

    def impl(value):  # type: ignore[no-untyped-def]
        return None

    declared.__annotations__ = {"value": sent, "return": None}
    impl.__annotations__ = {"value": taken, "return": None}
    contract = remote_task(name=f"rt.py.{uuid.uuid4().hex[:8]}", queue="rt")(declared)

    # What the implementation really receives, from a call validated by the contract.
    sample = {
        Receipt: {"key": "k", "size": 1},
        Colour: "red",
        tuple[int, int]: [1, 2],
        set[int]: [1, 2],
        float: 1.5,
        dict[str, int]: {"a": 1},
        dict[int, int]: {"1": 1},
    }[sent]
    received = contract.binder.receive([sample], {}).values["value"]
    try:
        _adapter(taken).validate_python(received, strict=True)
        fits = True
    except ValidationError:
        fits = False
    assert not fits  # the premise: the implementation is handed a value it does not take
    findings = check_implementation(contract, impl)
    assert findings, f"check says ok: {taken} receives {type(received).__name__} {received!r}"


# Generated pairs, with pydantic as the oracle: when `check` says every value the
# contract sends fits the implementation's annotation, pydantic must accept the sent
# JSON under the implementation's annotation (test_compat.py asks jsonschema, which
# cannot see what pydantic leaves out of a schema: dict keys, for one).


class TD(TypedDict):
    a: int


class Small(BaseModel):
    a: int


class Strict(BaseModel, extra="forbid"):
    a: int


Typed = tuple[Any, st.SearchStrategy[Any]]
INT64 = st.integers(-(2**63), 2**63 - 1)
POOL: list[Typed] = [
    (int, INT64),
    (float, st.floats(allow_nan=False, allow_infinity=False, width=64)),
    (bool, st.booleans()),
    (str, st.text(max_size=4)),
    (None, st.none()),
    (Annotated[int, Field(ge=0)], st.integers(0, 2**63 - 1)),
    (Literal["a", "b"], st.sampled_from(["a", "b"])),
    (Literal[1, 2], st.sampled_from([1, 2])),
    (Colour, st.sampled_from(["red", "blue"])),
    (dict[str, int], st.dictionaries(st.text(max_size=3), INT64, max_size=2)),
    (dict[int, int], st.dictionaries(INT64.map(str), INT64, max_size=2)),
    (list[int], st.lists(INT64, max_size=2)),
    (TD, st.fixed_dictionaries({"a": INT64})),
    (Small, st.fixed_dictionaries({"a": INT64}, optional={"b": st.text(max_size=2)})),
    (Strict, st.fixed_dictionaries({"a": INT64})),
]


def _optional(typed: Typed) -> Typed:
    annotation, values = typed
    if annotation is None:
        return typed
    return (annotation | None, values | st.none())


TYPES = st.sampled_from(POOL) | st.sampled_from(POOL).map(_optional)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sent=TYPES, taken=TYPES, data=st.data())
def test_compat_ok_means_pydantic_accepts_what_the_contract_sends(
    sent: Typed, taken: Typed, data: st.DataObject
) -> None:
    narrow, wide = sent[0], taken[0]
    narrow = type(None) if narrow is None else narrow
    wide = type(None) if wide is None else wide
    verdict = subset(type_schema(narrow), type_schema(wide))
    if verdict.ok is not True:
        return
    raw = data.draw(sent[1])
    try:
        value = _adapter(narrow).validate_json(json.dumps(raw))
    except ValidationError:
        assume(False)
    wire = _adapter(narrow).dump_json(value)
    try:
        _adapter(wide).validate_json(wire)
    except ValidationError as exc:
        raise AssertionError(
            f"check says {narrow} fits {wide}, but {wire!r} is refused: {exc.errors()[0]['msg']}"
        ) from None


# --------------------------------------------------------------------------------------
# check / contracts: finding modules and apps
# --------------------------------------------------------------------------------------


def test_contracts_fails_on_a_module_that_raises_attribute_error_at_import() -> None:
    # find_app's AttributeError (no app in the module) and an AttributeError raised by
    # the module's own code look alike to _import: the half-imported module is taken as
    # "bindings without an app" and the command succeeds with half the contracts.
    result = cli("contracts", "tests.redteam.modules.attr_error")
    assert result.returncode != 0, "exit 0 with a partial list of contracts"
    assert "no_such_attribute" in result.stderr
    names = [c["name"] for c in json.loads(result.stdout)] if result.stdout.strip() else []
    assert names in ([], ["rt.first", "rt.second"])


def test_check_names_the_missing_dependency_of_a_worker_module() -> None:
    # Celery's find_app tries `<package>.celery` and swallows its ImportError: the
    # worker's missing extra becomes "no implementation found ... name the worker's
    # module", pointing the user away from the real problem.
    result = cli("check", "rt_pkgdep", extra_path=MODULES)
    assert result.returncode == 1
    assert "rt_dependency_not_installed" in result.stderr, result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# contracts: what the schemas say vs what travels
# --------------------------------------------------------------------------------------


def _asyncapi_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    return [e.message[:200] for e in validator.iter_errors(doc)]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


def test_asyncapi_is_valid_for_a_discriminated_union() -> None:
    # pydantic writes OpenAPI's `discriminator: {propertyName, mapping}`; an AsyncAPI
    # Schema Object's `discriminator` is a string (the property name).
    @remote_task(name="rt.pet", queue="rt")
    def pet(animal: Annotated[Cat | Dog, Field(discriminator="kind")]) -> None: ...

    contract = next(c for c in registry if c.name == "rt.pet")
    doc = document([contract], title="t", version="1")
    assert _asyncapi_errors(doc) == []


def test_asyncapi_keeps_queues_whose_names_differ_only_in_odd_characters_apart() -> None:
    # _ident maps both "rt:q" and "rt_q" to the channel id "rt_q": the second queue's
    # messages land in the first queue's channel, under the wrong address.
    @remote_task(name="rt.colon", queue="rt:q")
    def colon(x: int) -> None: ...

    @remote_task(name="rt.underscore", queue="rt_q")
    def underscore(x: int) -> None: ...

    contracts = [c for c in registry if c.name in ("rt.colon", "rt.underscore")]
    doc = document(contracts, title="t", version="1")
    assert _asyncapi_errors(doc) == []
    where = {
        message_id: channel["address"]
        for channel in doc["channels"].values()
        for message_id in channel["messages"]
    }
    assert where == {"rt.colon": "rt:q", "rt.underscore": "rt_q"}


class Blob(BaseModel):  # no ser_json_bytes/val_json_bytes: pydantic's default, UTF-8
    data: bytes


def test_contracts_schema_of_bytes_in_a_model_matches_the_wire() -> None:
    # WireJsonSchema writes every bytes field as a base64 string; a model without
    # ser_json_bytes="base64" sends its bytes as raw UTF-8 text. A peer that trusts the
    # schema decodes base64 and gets other bytes (or an error).
    @remote_task(name="rt.blob", queue="rt")
    def blob(item: Blob) -> None: ...

    schema = describe(blob, default=True)["args"]
    field = schema["$defs"]["Blob"]["properties"]["data"]
    sent = blob.binder.bind((Blob(data=b"hi!?"),), {}).args[0]["data"]
    if field.get("contentEncoding") == "base64":
        import base64

        try:
            decoded = base64.b64decode(sent, validate=True)
        except ValueError:
            decoded = None
        assert decoded == b"hi!?", f"schema says base64, the wire carries {sent!r}"


# --------------------------------------------------------------------------------------
# call
# --------------------------------------------------------------------------------------


def _call(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(main, ["call", *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.integration
@pytest.mark.parametrize("timeout", ["nan", "NaN", "-nan"])
def test_call_refuses_a_nan_timeout_before_sending(timeout: str) -> None:
    # click's FloatRange lets NaN through (every comparison is False); the task is then
    # SENT, and the wait fails with ConfigurationError: exit 8 ("settings") and JSON
    # saying "state": "FAILURE" for a task that may well succeed.
    queue = f"rt-cli-{uuid.uuid4().hex[:10]}"
    env = {
        "CELERYBRIDGE_BROKER_URL": BROKERS["redis"],
        "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
    }
    result = _call(
        "-m", "tests.workers.bindings", "calc.add", "1", "2",
        "--queue", queue, "--wait", "--timeout", timeout, env=env,
    )  # fmt: skip
    try:
        assert result.exit_code == 2, result.output
        assert queue_length(BROKERS["redis"], queue) == 0, "sent before the timeout was checked"
    finally:
        purge(BROKERS["redis"], queue)


@pytest.mark.parametrize("url", ["ftp://x", "not a url"])
def test_call_bad_broker_option_has_a_documented_exit_code(url: str) -> None:
    # docs/cli.md: 1 is "a module cannot be imported", 2 usage, 8 settings (the broker
    # URL). --broker's own check raises a ClickException: exit 1.
    result = _call("-m", "tests.workers.bindings", "calc.add", "1", "2", "--broker", url)
    assert result.exit_code in (2, 8), (result.exit_code, result.output)


def test_call_module_raising_at_import_exits_1_with_a_message_not_a_traceback() -> None:
    result = cli("call", "-m", "tests.redteam.modules.attr_error", "rt.first", "1", "--dry-run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "no_such_attribute" in result.stderr


# --------------------------------------------------------------------------------------
# pusher: PUSHER_* read at celeryd_init
# --------------------------------------------------------------------------------------

EMBEDDED = """
import json
from celery.worker import WorkController
import os
from celery import signals
import pusher.celery as worker
if os.environ.get("RT_NO_S3_CHECK"):  # no S3 here: skip the bucket check, not the settings
    signals.worker_init.disconnect(worker._check_at_start)

# A worker run in-process (celery.contrib.testing.worker.start_worker, WorkController):
# Celery sends worker_init, not celeryd_init.
try:
    WorkController(app=worker.app, pool_cls="solo", concurrency=1, without_heartbeat=True,
                   without_mingle=True, without_gossip=True, queues=["rt-embedded"])
except SystemExit as exc:
    print(json.dumps({"refused": str(exc)}))
else:
    print(json.dumps({"retries": worker.app.tasks["pusher.send_to_s3"].max_retries}))
"""


def _embedded(**env: str) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHER_", "CELERYBRIDGE_"))}
    base.update(CELERYBRIDGE_BROKER_URL=BROKERS["redis"], **env)
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED], cwd=ROOT, env=base, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-800:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_pusher_in_process_worker_refuses_missing_settings() -> None:
    # Before the move, `import pusher.celery` refused bad PUSHER_*. Now only
    # celeryd_init does, and an in-process worker never sends it: worker_init's
    # handler raises ConfigurationError, Celery's dispatcher logs and swallows it, and
    # the worker starts, failing every task.
    out = _embedded()
    assert "refused" in out, out
    assert "PUSHER_BUCKET" in out["refused"]


def test_pusher_in_process_worker_applies_max_retries() -> None:
    out = _embedded(PUSHER_BUCKET="abc", PUSHER_MAX_RETRIES="7", RT_NO_S3_CHECK="1")
    assert out == {"retries": 7}
