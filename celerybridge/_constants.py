"""Names and defaults shared across the package, kept in one place."""

from typing import Final

ENV_PREFIX: Final = "CELERYBRIDGE_"

DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_QUEUE: Final = "celery"
DEFAULT_PUBLISH_TIMEOUT: Final = 10.0
DEFAULT_RESULT_TIMEOUT: Final = 60.0

# How often consumers of the filesystem transport (filesystem:///dir) look for messages.
FILESYSTEM_POLLING_INTERVAL: Final = 0.1

# Dead letters: messages a worker cannot accept go to "<queue>.dead" with these headers.
DEAD_LETTER_SUFFIX: Final = ".dead"
DEAD_REASON_HEADER: Final = "x-celerybridge-dead-reason"
DEAD_FROM_HEADER: Final = "x-celerybridge-dead-from"
# Why, in one machine-readable word (the reason header is for people). A letter refused
# for its signature or as a replay is never re-signed by ``dlq replay --all --sign``.
DEAD_KIND_HEADER: Final = "x-celerybridge-dead-kind"
DEAD_KIND_MALFORMED: Final = "malformed"  # not a well-formed protocol 2 JSON task message
DEAD_KIND_RAW: Final = "raw"  # a broker entry that is not a message at all, kept as it came
DEAD_KIND_SIGNATURE: Final = "signature"  # unsigned, forged, altered, expired
DEAD_KIND_REPLAY: Final = "replay"  # a signed task id seen before within the window
DEAD_KIND_UNKNOWN_TASK: Final = "unknown-task"
DEAD_KIND_CONTRACT: Final = "contract"  # arguments that fail the contract on receipt
DEAD_KIND_RETRIES: Final = "retries"  # failed after its automatic retries
DEAD_KIND_DELIVERIES: Final = "deliveries"  # delivered more than CELERYBRIDGE_MAX_DELIVERIES
DEAD_KINDS_NEVER_RESIGNED: Final = frozenset({DEAD_KIND_SIGNATURE, DEAD_KIND_REPLAY})

# How deep JSON may nest in a task message's body (arrays and objects, the body's own
# list counted), as the worker's intake (_worker/intake/shape.py) accepts it; Celery's own
# messages use 4. An argument sits two levels down ([args, kwargs, embed] > args or
# kwargs > the argument), so the caller accepts arguments nested MAX_ARGUMENT_DEPTH deep;
# a workflow's embedded steps sit deeper, and a message's encoded body is checked too.
MAX_BODY_DEPTH: Final = 32
BODY_ENVELOPE_DEPTH: Final = 2
MAX_ARGUMENT_DEPTH: Final = MAX_BODY_DEPTH - BODY_ENVELOPE_DEPTH

# The worker's intake (_worker/intake/): the largest body it reads (CELERYBRIDGE_MAX_MESSAGE_BYTES),
# and the record of signed messages already taken, kept as long as a signature is valid.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
SEEN_KEY_PREFIX: Final = "celerybridge-seen-"
# Seconds a message waits, held, before it goes back to its queue when the replay record
# cannot be read (it is not at fault: putting it back does not count as a delivery).
STORE_RETRY_PAUSE: Final = 1.0
# The only header of the stand-in for an AMQP message whose properties py-amqp cannot
# read (_worker/intake/amqp.py), and what it says; a dead letter names the headers it had to drop.
UNREADABLE_HEADER: Final = "x-celerybridge-unreadable-headers"
UNREADABLE: Final = "its properties or headers cannot be read"
DROPPED_HEADER: Final = "x-celerybridge-dropped-headers"

# Signed messages (CELERYBRIDGE_SIGNING_KEY): the headers a signing caller adds, what the
# HMAC-SHA256 covers (see _signing.py), and the limits a verifying worker applies.
SIGNATURE_HEADER: Final = "x-celerybridge-signature"
TIMESTAMP_HEADER: Final = "x-celerybridge-timestamp"
# Which key signed: the first 16 hex digits of SHA-256 over KEY_ID_DOMAIN + the key.
KEY_ID_HEADER: Final = "x-celerybridge-key-id"
KEY_ID_DOMAIN: Final = b"celerybridge signing key id\x00"
KEY_ID_LENGTH: Final = 16  # hex digits
SIGNATURE_SCHEME: Final = "celerybridge-hmac-sha256-v2"
# Refused: it signed the task name, id and arguments, not the embed (callbacks, chain...)
# nor the headers that say when and how a task runs.
SIGNATURE_SCHEME_V1: Final = "celerybridge-hmac-sha256-v1"
# The calling service's name (CELERYBRIDGE_SERVICE), on every message it sends; signed.
SERVICE_HEADER: Final = "x-celerybridge-service"
# The headers a signature covers besides its own timestamp and key id: every one that
# changes what runs, when, where or as whom. Missing and null sign the same. Others
# (traceparent, sentry-trace, baggage, origin...) may be added after signing.
SIGNED_HEADERS: Final = (
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "ignore_result",
    "replaced_task_nesting",
    "argsrepr",
    "kwargsrepr",
    # Not sent by Celery, but every header becomes an attribute of the task's request.
    # A header named like an embed part lands there when the body lacks that part;
    # ``headers`` becomes the request's custom headers, and ``stamps`` (named by
    # ``stamped_headers``) its execution options, both of which a retry is published
    # with: added unsigned, they would come back signed with the worker's key.
    "callbacks",
    "errbacks",
    "chain",
    "chord",
    "headers",
    "stamped_headers",
    "stamps",
    SERVICE_HEADER,
)
SIGNING_KEY_MIN_LENGTH: Final = 32  # characters: HMAC-SHA256 wants at least 32 bytes
DEFAULT_SIGNING_MAX_AGE: Final = 300.0  # seconds a signed message stays acceptable
SIGNING_CLOCK_SKEW: Final = 30  # seconds a signature may be ahead of the worker's clock

# The only serializer celerybridge ever sends or accepts.
SERIALIZER: Final = "json"
CONTENT_TYPE: Final = "application/json"
CONTENT_ENCODING: Final = "utf-8"

# Celery result states that end a task (celery.states.READY_STATES).
STATE_SUCCESS: Final = "SUCCESS"
STATE_FAILURE: Final = "FAILURE"
STATE_REVOKED: Final = "REVOKED"
READY_STATES: Final = frozenset({STATE_SUCCESS, STATE_FAILURE, STATE_REVOKED})

# The keyword delegate() reserves for version selection (the seed's ``version=``).
VERSION_KEYWORD: Final = "version"
# The keyword delegate() reserves for send options (``send_options={"countdown": 5}``).
SEND_OPTIONS_KEYWORD: Final = "send_options"

# The rpc:// result backend: Celery's worker publishes a task's states to the queue named
# by the task message's ``reply_to``, through the default exchange, with the task id as
# ``correlation_id`` (celery/backends/rpc.py). A bridge declares one reply queue as
# Celery's ``RPCBackend.binding`` does: durable, auto-delete, and ``x-expires`` of
# ``result_expires`` (Celery's default: one day). Final results that arrive before
# anyone waits for them are kept, the latest RPC_REPLIES_KEPT of them; one drain of the
# Task ids a bridge's rpc:// reply queue expects replies for (the tasks it sent, the ones
# awaited): a reply for any other id is dropped, so forged replies cannot push real ones out.
RPC_EXPECTED_KEPT: Final = 100_000
# The largest rpc:// reply read; larger ones (and compressed ones) are dropped unread.
RPC_REPLY_MAX_BYTES: Final = DEFAULT_MAX_MESSAGE_BYTES
# polling path reads at most RPC_DRAIN_LIMIT messages (Celery's backlog_limit).
RPC_REPLY_QUEUE_EXPIRES: Final = 86400.0  # seconds
RPC_REPLIES_KEPT: Final = 10_000
RPC_DRAIN_LIMIT: Final = 1000

# The reliable Redis transport of workers (_worker/redis_transport/): the property of a Redis
# message that counts its deliveries (added to as it is put back by the sweep or a
# requeue), the list suffix where the take script moves entries it refuses, as they came,
# for the worker to dead-letter, how many deliveries a message may have before it is
# dead-lettered (CELERYBRIDGE_MAX_DELIVERIES), the most messages one take records at once
# when the channel has no prefetch limit, how long an idle channel waits on its first
# list before looking at its others (priority lists, other queues), and what joins a
# delivery tag to the suffix that tells two messages with the same tag apart in the
# unacknowledged hash.
DELIVERIES_PROPERTY: Final = "x-celerybridge-deliveries"  # in a Redis message's properties
HOLD_SUFFIX: Final = ".dead.held"  # entries the take script refused, as they came
UNRESTORABLE_QUEUE: Final = "celerybridge.unrestorable"  # a record naming no queue: dead here
DEFAULT_MAX_DELIVERIES: Final = 10
TAKE_BATCH: Final = 16
SEVERAL_LISTS_WAIT: Final = 0.1  # seconds
TAG_ALIAS_SEP: Final = "#celerybridge-"
# Entries up to this size are also scanned by the take script for what Python's json
# refuses and cjson reads (invalid UTF-8, control characters): ~30 ms a megabyte in Redis.
SCAN_LIMIT: Final = 1024 * 1024
# The transport options the reliable channels read besides kombu's (set by celery_app
# from CELERYBRIDGE_MAX_MESSAGE_BYTES, CELERYBRIDGE_MAX_DELIVERIES; the refresh interval
# is a quarter of the visibility timeout unless given).
MAX_BYTES_OPTION: Final = "celerybridge_max_message_bytes"
MAX_DELIVERIES_OPTION: Final = "celerybridge_max_deliveries"
REFRESH_OPTION: Final = "celerybridge_refresh_interval"
# Channel attributes the intake gate reads: the queue the last entry was taken from (an
# envelope names a routing key of the sender's choosing, the take names the real one);
# the delivery tags of messages taken more often than CELERYBRIDGE_MAX_DELIVERIES allows,
# mapped to (deliveries, limit); the tags the intake puts back without counting a delivery.
POPPED_FROM: Final = "celerybridge_popped_from"
OVER_LIMIT: Final = "celerybridge_over_limit"
UNCOUNTED: Final = "celerybridge_uncounted"
# The oldest Redis the reliable transport runs on (BLMOVE, Lua scripts).
REDIS_MIN_VERSION: Final = (6, 2)

# Polling the result backend (kombu path): first wait, growth factor, ceiling, in seconds.
POLL_INITIAL: Final = 0.002
POLL_FACTOR: Final = 1.5
POLL_MAX: Final = 0.1

# Attempts kombu makes to publish one message (Celery's publish retry policy).
PUBLISH_ATTEMPTS: Final = 4
# That policy (Celery's task_publish_retry_policy) on the kombu path, and as the publish
# signals tell it on both paths.
PUBLISH_RETRY_POLICY: Final = {
    "max_retries": PUBLISH_ATTEMPTS - 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

# Threads the kombu path may occupy at once, per bridge.
KOMBU_THREADS: Final = 16

# Celery protocol v2 as ``Celery.send_task`` writes it (celery/app/amqp.py, app/defaults.py).
CELERY_PERSISTENT_DELIVERY_MODE: Final = 2  # task_default_delivery_mode = "persistent"
CELERY_REPR_MAXSIZE: Final = 1024  # AMQP.argsrepr_maxsize / kwargsrepr_maxsize
CELERY_REPR_MAXLEVELS: Final = 3  # task_repr_maxlevels

# kombu's Redis transport conventions (kombu/transport/redis.py, default transport options).
KOMBU_REDIS_SEP: Final = "\x06\x16"
KOMBU_PRIORITY_STEPS: Final = (0, 3, 6, 9)
KOMBU_BINDING_PREFIX: Final = "_kombu.binding."
KOMBU_BINDING_PERMANENT_PREFIX: Final = "_kombu.binding_permanent."

# Celery's queue for ``send_task(queue=q)`` on AMQP (celery/app/amqp.py ``Queues.new_missing``):
# ``Queue(q, Exchange(q, "direct"), routing_key=q)``, both durable.
AMQP_EXCHANGE_TYPE: Final = "direct"
# Bytes of an AMQP content header frame besides its headers table, at most: frame header
# and end (8), class, weight, body size, flags (14), the other properties (short strings
# of at most 255 bytes: content type and encoding, correlation id, reply-to, expiration).
AMQP_HEADER_FRAME_OVERHEAD: Final = 8 + 14 + 5 * 256 + 16

# Queue arguments (CELERYBRIDGE_QUEUES, CELERYBRIDGE_DEFAULT_QUEUE_TYPE; see _queues.py).
# The queue types Celery can consume (celery/app/amqp.py ``Queues.new_missing``):
# RabbitMQ's streams need consumer offsets, which Celery does not send.
QUEUE_TYPE_ARGUMENT: Final = "x-queue-type"
QUEUE_TYPE_CLASSIC: Final = "classic"
QUEUE_TYPE_QUORUM: Final = "quorum"
QUEUE_TYPES: Final = (QUEUE_TYPE_CLASSIC, QUEUE_TYPE_QUORUM)
MAX_PRIORITY_ARGUMENT: Final = "x-max-priority"
# RabbitMQ's largest x-max-priority, and the largest AMQP priority property (one octet;
# kombu's Redis transport clamps it to 0..9).
MAX_PRIORITY: Final = 255
# Seconds: RabbitMQ reads a message TTL (the broker side of ``expires``) as milliseconds
# below 2**32, some 49.7 days.
MAX_MESSAGE_TTL: Final = (2**32 - 1) / 1000
# AMQP short strings (queue names, argument names) hold at most 255 bytes of UTF-8.
AMQP_SHORTSTR_BYTES: Final = 255

# Celery's Redis result backend: the key holding a task's meta, also the pub/sub channel
# its ``set`` PUBLISHes the meta on (celery/backends/base.py, backends/redis.py).
RESULT_KEY_PREFIX: Final = "celery-task-meta-"

# Reconnecting the native Redis clients: first pause, ceiling, in seconds.
RECONNECT_INITIAL: Final = 0.05
RECONNECT_MAX: Final = 1.0
# kombu Redis transport options that change which keys messages are written to, or how
# priorities map to lists: the fast path leaves a broker with any of them to kombu.
REDIS_WIRE_OPTIONS: Final = frozenset({"global_keyprefix", "priority_steps", "sep"})
# Attempts the native publisher makes when the connection breaks (kombu path: 3 retries).
PUBLISH_RETRIES: Final = 3
# Connections the native Redis client opens at most, per bridge (kombu path: 16 threads).
REDIS_CONNECTIONS: Final = 16
# Messages the native Redis publisher sends in one pipeline at most.
BATCH_MAX: Final = 256
# Publishes a native publisher validates and encodes per iteration of the event loop, and
# callers it resumes per iteration once the broker answered (``_transports._window``):
# 4 of each keeps an iteration near a millisecond (before, 8 publishes held until answered
# did; 32 made 4-5 ms of loop lag with 50 concurrent; see docs/benchmarks.md).
PUBLISH_BUILDERS: Final = 4
# Publishes a native publisher admits at once, built or waiting for the broker, and the
# bytes they may hold: round trips to a distant broker overlap up to this window (1,000
# at 100 ms is 10,000 msg/s); beyond it callers wait, before their message is built.
PUBLISH_WINDOW_MESSAGES: Final = 1024
# ... on RabbitMQ: publishes sent and not yet confirmed. aio-pika/aiormq keep several times
# more objects alive per message than redis-py: with 128 or more at once the garbage
# collector stalled the loop for 2-3 ms now and then, and ran a full collection (50-60 ms)
# every few bursts of 1,000; with 32, as rarely as with 8. 32 still overlaps some 250
# confirms per second at 100 ms (a burst of 1,000 in 4 s, against 10 for kombu's path).
AMQP_WINDOW_MESSAGES: Final = 32
PUBLISH_WINDOW_BYTES: Final = 16 * 1024 * 1024
# Batches the native Redis publisher has on the wire at once, each on a pool connection.
REDIS_BATCHES: Final = REDIS_CONNECTIONS
# ... unless Redis is near: its fastest recent batch answered within this many seconds.
# Then one batch at a time: the answer is back within an iteration of the loop or two,
# and publishes made meanwhile go in the next batch, a bigger one (fewer writes and reads
# per message). The fastest round trip is remembered with a drift up of this factor per
# batch, so a Redis that became slow (or far: a failover) is seen as such.
REDIS_NEAR: Final = 0.001
REDIS_RTT_DRIFT: Final = 1.01

# The worker's asyncio pool (_worker/pool/): plain ``def`` tasks run in a thread pool of
# at most this many threads (and never more than the worker's concurrency); the
# Celery setting ``celerybridge_pool_threads`` changes it.
POOL_SYNC_THREADS: Final = 8
# The pool's loop-lag watchdog warns when the worker's event loop has not run its
# callbacks for this many seconds (a blocking call inside a coroutine task); the Celery
# setting ``celerybridge_loop_lag_warning`` changes it, 0 turns the watchdog off.
LOOP_LAG_WARNING: Final = 0.5
# How often the watchdog looks at the loop, as a fraction of the warning threshold.
LOOP_LAG_CHECKS_PER_THRESHOLD: Final = 4
# On the asyncio pool a coroutine task's result is stored in Redis from a thread of this
# many (per worker process) while the task's greenlet waits, so the event loop runs the
# other tasks meanwhile (_worker/final_state.py).
RESULT_STORE_THREADS: Final = 4

# A coroutine task past its hard time limit is failed at once from a timer thread; if
# the worker's event loop is still blocked this many seconds later (a blocking call or
# a CPU-bound loop in the body), the loop cannot be won back: the worker process exits
# with POOL_FATAL_EXIT_CODE, as prefork kills a child, so a supervisor restarts it.
POOL_HARD_LIMIT_GRACE: Final = 3.0
# The exit status of a worker process whose event loop was lost (EX_SOFTWARE).
POOL_FATAL_EXIT_CODE: Final = 70
# Seconds the consumer's thread gets to run the callbacks queued before a fatal exit
# (the failure of the task that caused it, acknowledgements) before the process ends anyway.
POOL_FATAL_EXIT_DELAY: Final = 5.0
