"""moto's S3 server as the demo runs it: ``python -m examples.fastapi_app.s3server -p PORT``.

The same as ``python -m moto.server`` (same options), less werkzeug's banner line
"WARNING: This is a development server. Do not use it in a production deployment.": it is
meant for people deploying a Flask app, and moto's server is a test double that the demo
starts on purpose, on loopback, for as long as it runs. Every other line (the address,
each request) is kept.
"""

from __future__ import annotations

import logging
import sys

from moto.server import main

DEV_SERVER_WARNING = "This is a development server"


class _DropDevServerWarning(logging.Filter):
    """Removes the warning's line from werkzeug's startup record, keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if DEV_SERVER_WARNING not in message:
            return True
        kept = [line for line in message.splitlines() if DEV_SERVER_WARNING not in line]
        record.msg, record.args = "\n".join(kept), None
        return bool(kept)


if __name__ == "__main__":
    logging.getLogger("werkzeug").addFilter(_DropDevServerWarning())
    main(sys.argv[1:])
