"""celerybridge: typed, async-first calls between Python services over Celery.

Declare a contract once, in a bindings module::

    @remote_task(name="pusher.send_to_s3", queue="pusher")
    def send_to_s3(key: str, content: str) -> Receipt: ...

call it from async code, validated before anything is sent::

    handle = await send_to_s3.delegate("items/1.json", "{}")
    receipt = await handle

and implement it in the service that owns it::

    @send_to_s3.implement(app)
    async def upload(key: str, content: str) -> Receipt: ...

The package is laid out by side (every module but this one and ``fastapi`` is private):

- contracts, both sides: ``_contracts``, ``_registry``, ``_validation``, ``_options``,
  ``_canvas``, ``_schema``;
- the caller side: ``_bridge`` and ``_default`` (delegation), ``_transports/`` (how a
  message is published and a result awaited, per broker), ``_result`` (handles);
- the wire format: ``_transports/_protocol`` (Celery protocol 2 messages), ``_signing``;
- the worker side: ``_worker/`` (the app, its event loop, the intake gate, dead letters,
  the Redis transport of workers);
- the operator's tools: ``_cli`` and what it runs (``_call``, ``_check``, ``_dlq``,
  ``_asyncapi``);
- shared: ``_config``, ``_constants``, ``_exceptions``, ``_utils``.
"""

from importlib.metadata import version as _version

from ._bridge import Bridge
from ._config import BridgeSettings
from ._contracts import RemoteTask, remote_task
from ._default import close_default_bridge, configure, delegate
from ._exceptions import (
    ArgumentError,
    CallError,
    CeleryBridgeError,
    ConfigurationError,
    ContractError,
    DeadLetteredError,
    DelegationError,
    PublishTimeoutError,
    RemoteTaskError,
    ResultBackendError,
    ResultError,
    ResultTimeoutError,
    SignatureMismatchError,
    UnknownTaskError,
    UnknownVersionError,
)
from ._result import ContractResult, GroupHandle, TaskHandle
from ._transports.base import OutgoingMessage, Publisher, ResultSource, TaskOutcome
from ._transports.memory import MemoryTransport
from ._worker.app import caller_service, celery_app
from ._worker.loop import WorkerResource, run_on_worker_loop, worker_resource
from ._worker.pool.pool import AsyncioPool

__version__ = _version("celerybridge")

__all__ = [
    "ArgumentError",
    "AsyncioPool",
    "Bridge",
    "BridgeSettings",
    "CallError",
    "CeleryBridgeError",
    "ConfigurationError",
    "ContractError",
    "ContractResult",
    "DeadLetteredError",
    "DelegationError",
    "GroupHandle",
    "MemoryTransport",
    "OutgoingMessage",
    "PublishTimeoutError",
    "Publisher",
    "RemoteTask",
    "RemoteTaskError",
    "ResultBackendError",
    "ResultError",
    "ResultSource",
    "ResultTimeoutError",
    "SignatureMismatchError",
    "TaskHandle",
    "TaskOutcome",
    "UnknownTaskError",
    "UnknownVersionError",
    "WorkerResource",
    "__version__",
    "caller_service",
    "celery_app",
    "close_default_bridge",
    "configure",
    "delegate",
    "remote_task",
    "run_on_worker_loop",
    "worker_resource",
]
