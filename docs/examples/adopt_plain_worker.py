"""A worker written the seed's way, with plain Celery and no celerybridge.

Its task has drifted from the contract in ``acme-pusher-bindings``: it grew a required
parameter the callers do not send. ``celerybridge check`` finds it (see ``adopt_worker.py``).
"""

from __future__ import annotations

from celery import Celery

# --8<-- [start:plain]
app = Celery("acme_pusher")


@app.task(name="acme_pusher.archive")
def archive(key: str, document: str, retention_days: int) -> dict[str, object]:
    return {"key": key, "size": len(document.encode())}


# --8<-- [end:plain]
