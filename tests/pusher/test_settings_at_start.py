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


def _run_fresh(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, with no PUSHER_* or CELERYBRIDGE_* setting but a
    broker URL (nothing connects to it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHER_", "CELERYBRIDGE_"))}
    env["CELERYBRIDGE_BROKER_URL"] = "redis://127.0.0.1:6379/2"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_are_read_at_worker_start_and_configure_the_worker() -> None:
    done = _run_fresh(SCRIPT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "concurrency": 3,
        "visibility": 400,
        "retries": [2, 2, 2],
        "refused": "the pusher cannot start: PUSHER_BUCKET: String should have at least 3 "
        "characters",
    }


VISIBILITY = """
import json, logging, os
from celery import signals
import pusher.celery as worker

out = {"default": worker.PusherSettings(bucket="bbb").visibility_timeout}
os.environ.update(PUSHER_BUCKET="backups", PUSHER_VISIBILITY_TIMEOUT="10",
                  PUSHER_TASK_TIME_LIMIT="20")
records = []
logging.getLogger("pusher").addHandler(logging.Handler())
logging.getLogger("pusher").handlers[-1].emit = records.append
signals.celeryd_init.send(sender="test", conf=worker.app.conf, instance=None, options={})
out["started"] = worker.app.conf.broker_transport
signals.worker_ready.send(sender="test")
out["warned"] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
worker.app.conf.broker_transport = "redis"  # kombu's own: running tasks are not refreshed
try:
    signals.celeryd_init.send(sender="test", conf=worker.app.conf, instance=None, options={})
except SystemExit as exc:
    out["refused"] = str(exc)
print(json.dumps(out))
"""


def test_a_visibility_timeout_under_the_time_limit_only_warns_on_celerybridges_transport() -> None:
    """The refresher keeps running tasks' records fresh (none is restored while its worker
    lives): PUSHER_VISIBILITY_TIMEOUT need not exceed PUSHER_TASK_TIME_LIMIT, which kept
    the default at 3600 s and a killed worker's upload waiting ~75 minutes. kombu's own
    transport still needs it."""
    done = _run_fresh(VISIBILITY)
    assert done.returncode == 0, done.stderr
    problem = "PUSHER_VISIBILITY_TIMEOUT (10 s) does not exceed PUSHER_TASK_TIME_LIMIT (20 s)"
    assert json.loads(done.stdout) == {
        "default": 360,
        "started": "celerybridge._worker.redis_transport:Transport",
        "warned": [
            f"{problem}: celerybridge's Redis transport refreshes the records of running "
            "tasks, so none is delivered twice while its worker lives; a worker that stalls "
            "longer than the visibility timeout may see its task run again elsewhere"
        ],
        "refused": f"the pusher cannot start: {problem}: kombu's Redis transport "
        "(broker_transport) redelivers tasks that are still running",
    }
