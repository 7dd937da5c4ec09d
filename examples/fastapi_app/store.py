"""Where a service keeps its items: SQLite through SQLAlchemy 2's asyncio API."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import JSON, DateTime, String, func, select, update
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

PENDING, DONE, FAILED = "pending", "done", "failed"


class Base(DeclarativeBase):
    pass


class Item(Base):
    """An item and the state of its backup to S3."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    service: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int]
    note: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    backup_task_id: Mapped[str | None] = mapped_column(String(36))
    """The pusher task's id; ``None`` until the broker accepted the backup."""
    backup_state: Mapped[str] = mapped_column(String(10), default=PENDING)
    backup_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The receipt once done, the error once failed, why it is not queued yet otherwise."""


class Store:
    """The service's database: an engine and a session factory."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[Store]:
        """Connect, create the tables if needed, and dispose of the engine on exit."""
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            yield cls(engine)
        finally:
            await engine.dispose()

    async def add(self, session: AsyncSession, **fields: Any) -> Item:
        """Insert an item (flushed for its id, committed by the caller)."""
        item = Item(**fields)
        session.add(item)
        await session.flush()
        await session.refresh(item)  # created_at, set by the database
        return item

    async def update(self, item: Item, **changes: Any) -> None:
        """Write ``changes`` to the item's row, in a transaction of their own."""
        async with self.sessions() as session:
            await session.execute(update(Item).where(Item.id == item.id).values(**changes))
            await session.commit()
        for name, value in changes.items():
            setattr(item, name, value)

    async def recent(self, session: AsyncSession, limit: int = 50) -> Sequence[Item]:
        rows = await session.scalars(select(Item).order_by(Item.id.desc()).limit(limit))
        return rows.all()

    async def not_queued(self, session: AsyncSession, limit: int = 100) -> Sequence[Item]:
        """Items whose backup the broker has not accepted yet (it was down)."""
        query = (
            select(Item)
            .where(Item.backup_task_id.is_(None), Item.backup_state == PENDING)
            .order_by(Item.id)
            .limit(limit)
        )
        return (await session.scalars(query)).all()
