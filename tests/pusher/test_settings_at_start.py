"""The pusher reads ``PUSHER_*`` when a worker starts (``celeryd_init``), not at import:
``import pusher.celery`` needs no settings, and the worker is configured from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os
from celery import signals
import pusher.celery as worker  # no PUSHER_* yet: must import

os.environ.update(PUSHER_BUCKET="backups", PUSHER_CONCURRENCY="3", PUSHER_MAX_RETRIES="2",
                  PUSHER_VISIBILITY_TIMEOUT="400")
signals.celeryd_init.send(sender="test", conf=worker.app.conf, instance=None, options={})
conf = worker.app.conf
out = {
    "concurrency": conf.worker_concurrency,
    "visibility": conf.broker_transport_options.get("visibility_timeout"),
    "retries": [worker.app.tasks[name].max_retries for name in
                ("pusher.send_to_s3", "pusher.send_to_s3_v2", "pusher.send_to_s3_v3")],
}
worker.settings.cache_clear()
os.environ["PUSHER_BUCKET"] = "x"
try:
    signals.celeryd_init.send(sender="test", conf=conf, instance=None, options={})
except SystemExit as exc:
    out["refused"] = str(exc)
print(json.dumps(out))
"""


def test_settings_are_read_at_worker_start_and_configure_the_worker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHER_", "CELERYBRIDGE_"))}
    env["CELERYBRIDGE_BROKER_URL"] = "redis://127.0.0.1:6379/2"  # nothing is connected
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "concurrency": 3,
        "visibility": 400,
        "retries": [2, 2, 2],
        "refused": "the pusher cannot start: PUSHER_BUCKET: String should have at least 3 "
        "characters",
    }
