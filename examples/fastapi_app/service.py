"""A FastAPI service that saves items and backs each one up to S3 through the pusher.

Service A and Service B are two instances of :func:`create_app` that differ only in
how they call the pusher: contract v1, and v2 with metadata. Saving answers as soon
as the broker has the backup task; the backup's state is read from the result backend
when asked for, and kept in the database once final.
"""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic_settings import BaseSettings

from celerybridge import (
    Bridge,
    CallError,
    DelegationError,
    RemoteTask,
    RemoteTaskError,
    ResultBackendError,
    ResultError,
    ResultTimeoutError,
    TaskHandle,
)
from celerybridge.fastapi import BridgeDep, bridge_lifespan
from pusher.bindings import Receipt

from .models import BackupOut, BackupState, ItemIn, ItemOut, ItemRecord
from .store import DONE, FAILED, PENDING, Item, Store

log = logging.getLogger(__name__)

RESEND_INTERVAL = 2.0
"""Seconds between attempts to queue backups the broker refused (it was down)."""
RESULT_READ_TIMEOUT = 5.0

Backup = Callable[[Bridge, str, str, ItemRecord], Awaitable[TaskHandle[Receipt]]]
"""Sends one item's backup: ``(bridge, key, content, item) -> handle``."""


@dataclass(frozen=True)
class Service:
    """What makes Service A and Service B different."""

    name: str
    """Also the S3 key prefix: ``<name>/items/<id>.json``."""
    title: str
    """What people see: "Service A"."""
    stub: RemoteTask[Any, Receipt]
    """The pusher contract version it calls."""
    backup: Backup

    @property
    def contract(self) -> str:
        """How the pusher is called, for people reading the page."""
        parameters = ", ".join(self.stub.binder.signature.parameters)
        return f"{self.stub.name} v{self.stub.version} ({parameters})"

    def rebuild(self, bridge: Bridge, task_id: str) -> TaskHandle[Receipt]:
        """The handle of a backup sent earlier, from its task id."""
        return bridge.handle(self.stub, task_id)


class ServiceSettings(BaseSettings):
    """Per service, from ``<PREFIX>DATABASE_URL`` (e.g. ``SERVICE_A_DATABASE_URL``)."""

    database_url: str | None = None
    """Default: ``<service name>.db`` in the working directory. (Not ``:memory:``: SQLAlchemy
    shares one connection between its sessions there, so one session's rollback would undo
    another's uncommitted insert.)"""


@dataclass
class Backups:
    """Sends backups, reads their outcome, and retries the ones the broker refused.

    No database transaction is open while the broker or the result backend is called:
    SQLite would hold its lock for as long as they take (a publish timeout, say).
    """

    service: Service
    store: Store
    sending: set[int] = field(default_factory=set)
    """Items being queued right now: the retry loop leaves them to their request."""

    def key_of(self, item: ItemRecord) -> str:
        return f"{self.service.name}/items/{item.id}.json"

    async def save(self, bridge: Bridge, new: ItemIn) -> Item:
        """Save a new item, then queue its backup."""
        async with self.store.sessions() as session:
            item = await self.store.add(session, **new.model_dump(), service=self.service.name)
            self.sending.add(item.id)  # before the commit makes it visible to the retry loop
            try:
                await session.commit()
                await self._send(bridge, item)
            finally:
                self.sending.discard(item.id)
        return item

    async def _send(self, bridge: Bridge, item: Item) -> None:
        """Queue the item's backup; if the broker is unreachable, leave it for the retry loop."""
        record = ItemRecord.model_validate(item)
        try:
            handle = await self.service.backup(
                bridge, self.key_of(record), record.model_dump_json(), record
            )
        except DelegationError as exc:  # the broker is down: the retry loop tries again
            log.warning("backup of item %s not queued (will retry): %s", item.id, exc)
            await self.store.update(
                item, backup_detail={"error": f"not queued yet, will retry: {exc}"}
            )
        except CallError as exc:  # the contract refused it: retrying cannot help
            await self.store.update(item, backup_state=FAILED, backup_detail={"error": str(exc)})
        else:
            await self.store.update(item, backup_task_id=handle.id, backup_detail=None)

    async def refresh(self, bridge: Bridge, item: Item) -> None:
        """Read a pending backup's outcome from the result backend, if it has one."""
        if item.backup_state != PENDING or item.backup_task_id is None:
            return
        handle = self.service.rebuild(bridge, item.backup_task_id)
        try:
            if not await handle.done():
                return
            receipt = await handle.result(timeout=RESULT_READ_TIMEOUT)
        except RemoteTaskError as exc:
            error = f"{exc.remote_type}: {exc.remote_message}"
            await self.store.update(item, backup_state=FAILED, backup_detail={"error": error})
        except (ResultBackendError, ResultTimeoutError, DelegationError) as exc:
            # The result backend is down or slow: still pending, ask again next time.
            item.backup_detail = {"error": f"state unknown for now: {exc}"}
        except ResultError as exc:  # a receipt that does not match the contract
            await self.store.update(item, backup_state=FAILED, backup_detail={"error": str(exc)})
        else:
            detail = {"receipt": receipt.model_dump(mode="json")}
            await self.store.update(item, backup_state=DONE, backup_detail=detail)

    async def resend_forever(self, bridge: Bridge) -> None:
        """Every few seconds, queue the backups the broker refused (or a crash left unsent)."""
        while True:
            await anyio.sleep(RESEND_INTERVAL)
            try:
                await self._resend(bridge)
            except Exception:  # e.g. "database is locked": log it, try again next time
                log.exception("retrying unsent backups failed")

    async def _resend(self, bridge: Bridge) -> None:
        async with self.store.sessions() as session:
            waiting = [item.id for item in await self.store.not_queued(session)]
        for item_id in waiting:
            if item_id in self.sending:
                continue
            self.sending.add(item_id)
            try:
                async with self.store.sessions() as session:
                    item = await session.get(Item, item_id)  # as committed by now
                if item is not None and item.backup_task_id is None:
                    await self._send(bridge, item)
            finally:
                self.sending.discard(item_id)

    async def get(self, bridge: Bridge, item_id: int) -> Item:
        async with self.store.sessions() as session:
            item = await session.get(Item, item_id)
        if item is None:
            raise HTTPException(404, f"no item {item_id}")
        await self.refresh(bridge, item)
        return item


def describe(item: Item) -> ItemOut:
    detail: dict[str, Any] = item.backup_detail or {}
    backup = BackupOut(
        state=cast(BackupState, item.backup_state),
        task_id=item.backup_task_id,
        receipt=detail.get("receipt"),
        error=detail.get("error"),
    )
    return ItemOut(**ItemRecord.model_validate(item).model_dump(), backup=backup)


def get_backups(request: Request) -> Backups:
    backups: Backups = request.app.state.backups
    return backups


BackupsDep = Annotated[Backups, Depends(get_backups)]

PAGE = (Path(__file__).parent / "page.html").read_text()


def create_app(
    service: Service, settings: ServiceSettings | None = None, **bridge_options: Any
) -> FastAPI:
    """The service's ASGI app; ``bridge_options`` go to :func:`bridge_lifespan`."""
    settings = settings or ServiceSettings()
    database_url = settings.database_url or f"sqlite+aiosqlite:///{service.name}.db"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with (
            Store.open(database_url) as store,
            bridge_lifespan(**bridge_options)(app) as state,
            anyio.create_task_group() as background,
        ):
            app.state.backups = backups = Backups(service, store)
            background.start_soon(backups.resend_forever, state["celerybridge"])
            yield state
            background.cancel_scope.cancel()

    app = FastAPI(title=service.name, lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        text = PAGE
        for placeholder, value in (
            ("{{title}}", service.title),
            ("{{service}}", service.name),
            ("{{contract}}", service.contract),
        ):
            text = text.replace(placeholder, html.escape(value))
        return text

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Which service answers: the demo calls it up only when its own name comes back."""
        return {"service": service.name}

    @app.post("/items", status_code=201)
    async def save(new: ItemIn, bridge: BridgeDep, backups: BackupsDep) -> ItemOut:
        """Save the item, queue its backup and answer without waiting for the upload."""
        return describe(await backups.save(bridge, new))

    @app.get("/items")
    async def recent(bridge: BridgeDep, backups: BackupsDep) -> list[ItemOut]:
        """The latest items, newest first, with their backup state."""
        async with backups.store.sessions() as session:
            items = await backups.store.recent(session)
        for item in items:
            await backups.refresh(bridge, item)
        return [describe(item) for item in items]

    @app.get("/items/{item_id}")
    async def one(item_id: int, bridge: BridgeDep, backups: BackupsDep) -> ItemOut:
        return describe(await backups.get(bridge, item_id))

    @app.get("/items/{item_id}/backup")
    async def backup(item_id: int, bridge: BridgeDep, backups: BackupsDep) -> BackupOut:
        """``pending``, ``done`` with the receipt, or ``failed`` with the error."""
        return describe(await backups.get(bridge, item_id)).backup

    return app
