"""Bindings plus a celerybridge implementation plus a plain task: all compatible."""

from celery import Celery

from celerybridge import remote_task

app = Celery("good", set_as_current=False)


@remote_task(name="cli.add", queue="cli")
def add(x: int, y: int) -> int: ...


@remote_task(name="cli.add", queue="cli", version=2)
def add_v2(x: int, y: int, z: int) -> int: ...


@add.implement(app)
def add_impl(x: int, y: int) -> int:
    return x + y


@app.task(name="cli.add_v2")
def plain_add_v2(x: int, y: int, z: int) -> int:
    return x + y + z
