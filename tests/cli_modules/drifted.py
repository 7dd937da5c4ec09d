"""A plain worker whose v2 task drifted from the contract (a parameter was renamed)."""

from celery import Celery

from celerybridge import remote_task

app = Celery("drifted", set_as_current=False)


@remote_task(name="cli.drift", queue="cli")
def drift(key: str, content: str) -> None: ...


@remote_task(name="cli.drift", queue="cli", version=2)
def drift_v2(key: str, content: str, meta: dict[str, str]) -> None: ...


@app.task(name="cli.drift")
def v1(key, content):  # type: ignore[no-untyped-def]
    return None


@app.task(name="cli.drift_v2")
def v2(key, content, metadata):  # type: ignore[no-untyped-def]
    return None
