"""Declaring contracts: version maps, wire names, defaults, deprecation, refusals."""

from __future__ import annotations

import warnings

import pytest

from celerybridge import (
    ContractError,
    MemoryTransport,
    RemoteTask,
    SignatureMismatchError,
    remote_task,
)
from celerybridge._registry import registry


def test_seed_wire_names_and_default_version() -> None:
    @remote_task(name="svc.send", queue="svc")
    def send(key: str, content: str) -> None: ...

    @remote_task(name="svc.send", queue="svc", version=2)
    def send_v2(key: str, content: str, meta: dict[str, str]) -> None: ...

    assert (send.wire_name, send_v2.wire_name) == ("svc.send", "svc.send_v2")
    assert registry.resolve("svc.send") is send
    assert registry.resolve("svc.send", 2) is send_v2
    assert registry.resolve("svc.send", "2") is send_v2  # the seed's version="2"
    assert repr(send_v2) == "<RemoteTask 'svc.send' v2 wire='svc.send_v2' queue='svc'>"


def test_default_flag_overrides_lowest_version() -> None:
    @remote_task(name="svc.pick", version=1)
    def pick() -> None: ...

    @remote_task(name="svc.pick", version=2, default=True)
    def pick_v2() -> None: ...

    assert registry.resolve("svc.pick") is pick_v2


def test_bare_decorator_names_task_after_module_and_function() -> None:
    @remote_task
    def ping() -> str: ...

    assert isinstance(ping, RemoteTask)
    assert ping.name == "tests.test_contracts.ping"
    assert ping.queue == "celery"


def test_deprecated_version_warns_at_the_callers_line() -> None:
    @remote_task(name="svc.old", deprecated="use version 2")
    def old(x: int) -> None: ...

    with pytest.warns(DeprecationWarning, match="deprecated") as record:
        old.bind((1,), {})
    assert str(record[0].message) == "task 'svc.old' v1 is deprecated: use version 2"
    assert record[0].filename == __file__


async def test_deprecated_version_warns_through_delegate() -> None:
    @remote_task(name="svc.older", deprecated=True)
    def older(x: int) -> None: ...

    from celerybridge import Bridge

    transport = MemoryTransport()
    async with Bridge(publisher=transport, results=transport) as bridge:
        with pytest.warns(DeprecationWarning, match=r"^task 'svc.older' v1 is deprecated$") as rec:
            await bridge.delegate("svc.older", 1)
        assert rec[0].filename == __file__
        with pytest.warns(DeprecationWarning, match="deprecated") as rec:
            await bridge.send(older, (1,), {})
        assert rec[0].filename == __file__
    assert len(transport.messages) == 2  # deprecated versions still work


def test_current_versions_do_not_warn() -> None:
    @remote_task(name="svc.current")
    def current(x: int) -> None: ...

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        current.bind((1,), {})


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (
            lambda: remote_task(name="svc.v")(lambda version: None),
            "task 'svc.v' v1: parameter name 'version' is reserved for version selection in "
            "delegate(); rename the parameter",
        ),
        (
            lambda: remote_task(name="svc.var")(lambda *items: None),
            "task 'svc.var' v1: parameter 'items' is variadic; a contract needs an explicit "
            "signature",
        ),
        (
            lambda: remote_task(name="svc.zero", version=0)(lambda: None),
            "task 'svc.zero': version must be an integer >= 1, got 0",
        ),
        (
            lambda: remote_task(name="has space")(lambda: None),
            "name must be a non-empty string without spaces, got 'has space'",
        ),
        (
            lambda: remote_task(name="svc.q", queue="")(lambda: None),
            "queue must be a non-empty string without spaces, got ''",
        ),
    ],
)
def test_bad_declarations_are_refused(declare: object, message: str) -> None:
    with pytest.raises(ContractError) as caught:
        declare()  # type: ignore[operator]
    assert str(caught.value) == message


def test_clashes_are_refused() -> None:
    @remote_task(name="svc.dup")
    def first() -> None: ...

    with pytest.raises(ContractError, match=r"task 'svc.dup' v1 is declared twice: by "):
        remote_task(name="svc.dup")(lambda: None)

    with pytest.raises(ContractError) as caught:
        remote_task(name="svc.other", wire_name="svc.dup")(lambda: None)
    assert str(caught.value) == (
        "wire name 'svc.dup' of task 'svc.other' v1 is already used by task 'svc.dup' v1"
    )

    @remote_task(name="svc.def", default=True)
    def d1() -> None: ...

    with pytest.raises(ContractError) as caught:
        remote_task(name="svc.def", version=2, default=True)(lambda: None)
    assert str(caught.value) == "task 'svc.def': versions 1 and 2 are both marked default=True"


def test_unresolvable_annotation_is_refused_at_declaration() -> None:
    def bad(x: NoSuchType) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ContractError, match=r"task 'svc.bad' v1: cannot resolve annotation"):
        remote_task(name="svc.bad")(bad)


def test_implementation_signature_is_checked_at_import() -> None:
    from celery import Celery

    app = Celery("t", set_as_current=False)

    @remote_task(name="svc.impl")
    def contract(key: str, content: str) -> None: ...

    with pytest.raises(SignatureMismatchError) as caught:

        @contract.implement(app)
        def wrong(key: str) -> None: ...

    assert str(caught.value).startswith(
        "test_implementation_signature_is_checked_at_import.<locals>.wrong cannot implement "
        "task 'svc.impl' v1: "
    )
    assert "too many positional arguments" in str(caught.value)

    with pytest.raises(SignatureMismatchError, match="by keyword"):

        @contract.implement(app)
        def renamed(k: str, c: str) -> None: ...

    with pytest.raises(ContractError, match=r"implement\(\) does not support bind=True"):

        @contract.implement(app, bind=True)
        def bound(self: object, key: str, content: str) -> None: ...

    @contract.implement(app)
    def fine(key: str, content: str, extra: int = 0) -> None: ...

    assert app.tasks["svc.impl"].name == "svc.impl"
    assert app.conf.accept_content == ["json"]  # implementing makes the app JSON-only


def test_with_options_validates_when_built() -> None:
    from celerybridge import ConfigurationError

    @remote_task(name="svc.opts", queue="a")
    def opts() -> None: ...

    changed = opts.with_options(queue="b", countdown=1.5, priority=9)
    assert (changed.queue, changed.options.countdown, changed.options.priority) == ("b", 1.5, 9)
    assert opts.queue == "a"
    with pytest.raises(ConfigurationError, match="priority must be an integer from 0 to 9"):
        opts.with_options(priority=10)
    with pytest.raises(ConfigurationError, match="countdown must be a positive, finite duration"):
        opts.with_options(countdown=-1)
