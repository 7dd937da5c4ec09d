# mypy: disable-error-code="empty-body"
"""Checked by ``mypy --strict`` in CI (not run by pytest).

Every ``type: ignore[...]`` marks a call mypy must reject; with ``warn_unused_ignores``
(part of --strict) a regression that lets the call through fails the type check.
"""

from __future__ import annotations

from typing import Any, assert_type

from pydantic import BaseModel

from celerybridge import Bridge, RemoteTaskError, TaskHandle, remote_task


class Receipt(BaseModel):
    key: str


@remote_task(name="typing.send", queue="typing")
def send(key: str, content: str) -> Receipt: ...


@remote_task(name="typing.send", queue="typing", version=2)
async def send_v2(key: str, content: str, meta: dict[str, str]) -> Receipt: ...


async def typed_calls() -> None:
    handle = await send.delegate("k", "c")
    assert_type(handle, TaskHandle[Receipt])
    assert_type(await handle, Receipt)
    assert_type(await handle.result(timeout=5), Receipt)
    assert_type(await (await send_v2.delegate("k", "c", {"a": "b"})), Receipt)
    await send.delegate(key="k", content="c")
    assert_type(await send.via(Bridge()).delegate("k", "c"), TaskHandle[Receipt])

    await send.delegate("k", 123)  # type: ignore[arg-type]
    await send.delegate("k")  # type: ignore[call-arg]
    await send.delegate("k", "c", "extra")  # type: ignore[call-arg]
    await send.delegate("k", "c", colour="red")  # type: ignore[call-arg]
    await send_v2.delegate("k", "c", {"a": 1})  # type: ignore[dict-item]
    send.delay("k", 1)  # type: ignore[arg-type]
    await send.via(Bridge()).delegate("k", 2)  # type: ignore[arg-type]
    send.with_options(queue="other").delay("k", b"c")  # type: ignore[arg-type]


def typed_canvas_and_sync_results() -> None:
    from celery.canvas import Signature

    from celerybridge import ContractResult

    assert_type(send.si("k", "c"), Signature[Receipt])
    assert_type(send.s("c"), Signature[Receipt])  # partial: the chain fills the key
    assert_type(send.signature(("k", "c"), countdown=5), Signature[Receipt])
    send.si("k", 123)  # type: ignore[arg-type]
    result = send.delay("k", "c")
    assert_type(result, ContractResult[Receipt])
    assert_type(result.get(timeout=5), Receipt)
    assert_type(send.apply_async(("k", "c"), countdown=1).get(), Receipt)
    # propagate=False returns the failure instead of raising it
    assert_type(result.get(propagate=False), Receipt | RemoteTaskError)
    assert_type(result.get(5, False), Receipt | RemoteTaskError)
    assert_type(result.get(propagate=True), Receipt)
    flag: bool = bool(result)
    assert_type(result.get(propagate=flag), Receipt | RemoteTaskError)
    send.with_options(task_id="fixed")  # type: ignore[arg-type]  # per call only


async def typed_workflows(bridge: Bridge) -> None:
    from celery import chain, group

    from celerybridge import GroupHandle

    assert_type(await bridge.send_canvas(group(send.si("k", "c"))), GroupHandle)
    assert_type(await bridge.send_canvas(chain(send.si("k", "c"))), TaskHandle[Any] | GroupHandle)
