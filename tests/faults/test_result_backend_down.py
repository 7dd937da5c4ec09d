"""The result backend goes down and comes back: no caller hangs, and the truth is kept.

The result backend is a private Redis (``_private_brokers``, fsynced append-only
file), SIGKILLed and started again on the same data; the broker is the shared test
broker. Two moments:

- while pushers store results, in the middle of a run of uploads: the worker retries
  storing (``result_backend_always_retry``, and Celery's Redis backend retries a
  broken connection for some 20 s), callers wait within their timeout, and once the
  backend is back every call's result is there (``bridge.handle(stub, id)``) and
  every object landed;
- while a caller awaits a result: it gets a typed error (``ResultTimeoutError`` or
  ``ResultBackendError``) within its timeout, never a hang, then the true result
  after recovery; on the Redis fast path and on the kombu path.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from celerybridge import Bridge, ResultBackendError, ResultTimeoutError
from pusher.bindings import send_to_s3

from .._brokers import BROKERS
from .._workers import Worker
from ._ledger import Ledger, content_for
from ._private_brokers import PrivateRedis
from .conftest import CountLedger, Progress, Scale, drive

pytestmark = pytest.mark.integration

RESULT_TIMEOUT = 30.0
WAIT = 3.0
"""How long a caller awaits a result while the backend is down."""
SLACK = 2.0
DOWN = 2.0


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A result backend of this test's own, killed at the end whatever happened."""
    server = PrivateRedis(tmp_path / "results")
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def _true_results(bridge: Bridge, ledger: Ledger, keys: list[str]) -> dict[str, str]:
    """Each key's receipt key, read after recovery through a handle made from the task id
    the worker ran it under (as a caller would, from an id kept in its database)."""
    ids = dict(ledger._rows("SELECT key, task_id FROM runs"))
    found = {}
    for key in keys:
        receipt = await bridge.handle(send_to_s3, ids[key]).result(timeout=RESULT_TIMEOUT)
        found[key] = receipt.key
    return found


async def test_the_backend_down_while_workers_store_results(
    backend: PrivateRedis,
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    ledger: Ledger,
    scale: Scale,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-results-{uuid.uuid4().hex[:6]}"
    start_ledger_pusher(broker, queue, result_backend=backend.url)
    restarts = 1 if scale.uploads < 1000 else 3

    async def restart(progress: Progress) -> None:
        for n in range(restarts):
            await progress.reached(scale.uploads * (n + 1) // (restarts + 2))
            ledger.fault("result backend restart")
            await anyio.to_thread.run_sync(lambda: backend.restart(DOWN))

    timings = await drive(
        broker,
        queue,
        ledger,
        scale.uploads,
        prefix=queue,
        during=restart,
        result_timeout=RESULT_TIMEOUT,
        bridge_options={"result_backend": backend.url},
    )
    tally = await count_ledger("result backend down")
    assert tally.landed == scale.uploads, tally
    assert max(result for _, result in timings) <= RESULT_TIMEOUT + SLACK

    # After recovery every call's result is there, those its caller missed included.
    unknown = [key for (key,) in ledger._rows("SELECT key FROM calls WHERE outcome != 'ok'")]
    async with Bridge(broker_url=BROKERS[broker], result_backend=backend.url) as bridge:
        found = await _true_results(bridge, ledger, unknown)
    assert found == {key: key for key in unknown}
    print(
        f"\n{broker}: {tally.ok} ok, {len(unknown)} unknown, all with their result after recovery"
    )


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "kombu"])
async def test_a_caller_awaiting_while_the_backend_is_down_gets_a_typed_error_then_the_truth(
    backend: PrivateRedis,
    start_ledger_pusher: Callable[..., Worker],
    broker: str,
    fast_path: bool,
    ledger: Ledger,
    count_ledger: CountLedger,
) -> None:
    queue = f"cb-faults-await-{uuid.uuid4().hex[:6]}"
    start_ledger_pusher(broker, queue, result_backend=backend.url)
    stub = send_to_s3.with_options(queue=queue)
    contents = {f"{queue}/{n:03d}.json": content_for(f"{queue}/{n:03d}.json", n) for n in range(9)}
    first, *rest = contents
    async with Bridge(
        broker_url=BROKERS[broker],
        result_backend=backend.url,
        fast_path=fast_path,
        publish_timeout=2,
    ) as bridge:
        # Connected and subscribed before the backend goes.
        handle = await bridge.send(stub, (first, contents[first]), {})
        assert (await handle.result(timeout=RESULT_TIMEOUT)).key == first

        await anyio.to_thread.run_sync(lambda: backend.stop())
        ledger.fault("result backend down")
        handles = {key: await bridge.send(stub, (key, contents[key]), {}) for key in rest}

        async def await_in_vain(key: str) -> tuple[str, float]:
            began = time.monotonic()
            with pytest.raises((ResultTimeoutError, ResultBackendError)) as caught:
                await handles[key].result(timeout=WAIT)
            return type(caught.value).__name__, time.monotonic() - began

        seen = await asyncio.gather(*(await_in_vain(key) for key in rest))
        assert max(elapsed for _, elapsed in seen) <= WAIT + SLACK, seen

        await anyio.to_thread.run_sync(backend.start)
        for key in rest:
            receipt = await bridge.handle(stub, handles[key].id).result(timeout=RESULT_TIMEOUT)
            assert (receipt.key, receipt.size) == (key, len(contents[key].encode()))
            ledger.call(key, contents[key], "ok", repr(receipt))
    ledger.call(first, contents[first], "ok")
    case = f"caller awaits, backend down ({'fast path' if fast_path else 'kombu'})"
    tally = await count_ledger(case)
    assert tally.landed == len(contents), tally
    kinds = sorted({kind for kind, _ in seen})
    print(f"\n{broker} {case}: {', '.join(kinds)} within {max(e for _, e in seen):.1f} s")
