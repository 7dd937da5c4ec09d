"""Names and defaults shared across the package, kept in one place."""

from typing import Final

ENV_PREFIX: Final = "CELERYBRIDGE_"

DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_QUEUE: Final = "celery"
DEFAULT_PUBLISH_TIMEOUT: Final = 10.0
DEFAULT_RESULT_TIMEOUT: Final = 60.0

# How often consumers of the filesystem transport (filesystem:///dir) look for messages.
FILESYSTEM_POLLING_INTERVAL: Final = 0.1

# The only serializer celerybridge ever sends or accepts.
SERIALIZER: Final = "json"
CONTENT_TYPE: Final = "application/json"

# Celery result states that end a task (celery.states.READY_STATES).
STATE_SUCCESS: Final = "SUCCESS"
STATE_FAILURE: Final = "FAILURE"
STATE_REVOKED: Final = "REVOKED"
READY_STATES: Final = frozenset({STATE_SUCCESS, STATE_FAILURE, STATE_REVOKED})

# The keyword delegate() reserves for version selection (the seed's ``version=``).
VERSION_KEYWORD: Final = "version"

# Polling the result backend (kombu path): first wait, growth factor, ceiling, in seconds.
POLL_INITIAL: Final = 0.002
POLL_FACTOR: Final = 1.5
POLL_MAX: Final = 0.1

# Attempts kombu makes to publish one message (Celery's publish retry policy).
PUBLISH_ATTEMPTS: Final = 4

# Threads the kombu path may occupy at once, per bridge.
KOMBU_THREADS: Final = 16
