"""A plain Celery task without annotations: its return cannot be compared."""

from celery import Celery

from celerybridge import remote_task

app = Celery("untyped", set_as_current=False)


@remote_task(name="cli.untyped", queue="cli")
def untyped(key: str) -> int: ...


@app.task(name="cli.untyped")
def plain(key):  # type: ignore[no-untyped-def]
    return len(key)
