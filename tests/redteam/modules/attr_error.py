"""Bindings with a bug: an AttributeError half-way through the module."""

import os

from celerybridge import remote_task


@remote_task(name="rt.first", queue="rt")
def first(x: int) -> int: ...


os.no_such_attribute  # noqa: B018  (the bug)


@remote_task(name="rt.second", queue="rt")
def second(x: int) -> int: ...
