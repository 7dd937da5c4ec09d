"""Send a saved fuzz case again: ``python -m tests.fuzz.repro CASE.json --queue QUEUE``.

The fuzz suite saves every case that broke an invariant as JSON (the wire exactly, with
its header values' types). Start a pusher on a queue of your own, e.g.::

    CELERYBRIDGE_BROKER_URL=redis://127.0.0.1:6379/2 PUSHER_BUCKET=... \\
        celery -A pusher worker -Q fuzz-repro --loglevel=info

then send the case to that queue and watch the worker's log and ``fuzz-repro.dead``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .._brokers import BROKERS
from ._wire import Broker, Wire


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path, help="a JSON file the fuzz suite saved")
    parser.add_argument("--queue", required=True, help="the queue a pusher worker consumes")
    parser.add_argument("--broker-url", help="default: the test broker the case was sent to")
    options = parser.parse_args(argv)
    document = json.loads(options.case.read_text())
    url = options.broker_url or BROKERS[document["broker"]]
    broker = Broker(document["broker"], url)
    wire = Wire.from_json(document["wire"])
    try:
        for _ in range(document.get("copies", 1)):
            problem = broker.send(wire, options.queue)
            if problem is not None:
                print(f"not sent: {problem}")
                return 1
    finally:
        broker.close()
    print(f"sent {document['case']} to {options.queue} ({document['broker']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
