"""The one exception tree of celerybridge.

Every error the library raises is a :class:`CeleryBridgeError`. The branches follow
the life of a call, so a handler can catch exactly the phase it cares about::

    CeleryBridgeError
    ├── ConfigurationError (also ValueError)    settings, URLs, timeouts
    ├── ContractError                           a contract declared wrongly
    │   └── SignatureMismatchError              an implementation that cannot accept its contract
    ├── CallError                               refused before anything was sent
    │   ├── UnknownTaskError (also LookupError)
    │   ├── UnknownVersionError (also LookupError)
    │   └── ArgumentError (also ValueError)
    ├── DelegationError                         the broker did not accept the message
    │   └── PublishTimeoutError (also TimeoutError)
    ├── ResultError                             the result could not be had
    │   ├── ResultTimeoutError (also TimeoutError)
    │   └── ResultBackendError                  the result backend failed while we waited
    └── RemoteTaskError                         the remote task ran and failed
        └── DeadLetteredError                   the worker refused the message: dead letter

Foreign exceptions (kombu, redis, amqp, Celery) are translated at one boundary,
``celerybridge._transports._errors``, always with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence


class CeleryBridgeError(Exception):
    """Root of every error raised by celerybridge."""


class ConfigurationError(CeleryBridgeError, ValueError):
    """Settings are missing or invalid (broker URL, result backend, timeouts)."""


class ContractError(CeleryBridgeError):
    """A contract (a ``@remote_task`` stub) is declared inconsistently."""


class SignatureMismatchError(ContractError):
    """An implementation's signature cannot accept the contract it implements."""


class CallError(CeleryBridgeError):
    """A call was refused before anything was sent to the broker."""


class UnknownTaskError(CallError, LookupError):
    """No contract is registered under the requested name."""

    def __init__(self, name: str, close_matches: Sequence[str]) -> None:
        self.name = name
        self.close_matches = tuple(close_matches)
        message = f"unknown task {name!r}"
        if self.close_matches:
            message += "; did you mean " + " or ".join(repr(m) for m in self.close_matches) + "?"
        else:
            message += "; is the bindings module that declares it imported?"
        super().__init__(message)


class UnknownVersionError(CallError, LookupError):
    """The contract exists but has no such version."""

    def __init__(self, name: str, version: object, known: Sequence[int]) -> None:
        self.name = name
        self.version = version
        self.known_versions = tuple(known)
        listed = ", ".join(str(v) for v in self.known_versions)
        super().__init__(f"task {name!r} has no version {version!r}; known versions: {listed}")


class ArgumentError(CallError, ValueError):
    """An argument does not fit the contract's signature or annotations.

    ``parameter`` is ``None`` when the fault is not one parameter's (too many
    positional arguments, for instance).
    """

    def __init__(self, task: str, version: int, parameter: str | None, problem: str) -> None:
        self.task = task
        self.version = version
        self.parameter = parameter
        self.problem = problem
        where = f"task {task!r} v{version}"
        if parameter is not None:
            where += f", parameter {parameter!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[ArgumentError], tuple[str, int, str | None, str]]:
        return (type(self), (self.task, self.version, self.parameter, self.problem))


class DelegationError(CeleryBridgeError):
    """The broker could not be reached or did not accept the message."""


class PublishTimeoutError(DelegationError, TimeoutError):
    """The broker did not accept the message within the publish timeout.

    The message may or may not have been delivered: treat the outcome as unknown.
    """


class ResultError(CeleryBridgeError):
    """The result of a delegated task could not be obtained."""


class ResultTimeoutError(ResultError, TimeoutError):
    """The task did not finish within the timeout given to ``result()``."""

    def __init__(self, task: str, version: int, task_id: str, timeout: float) -> None:
        self.task = task
        self.version = version
        self.task_id = task_id
        self.timeout = timeout
        super().__init__(
            f"task {task!r} v{version} ({task_id}) did not finish within {timeout:g} s"
        )


class ResultBackendError(ResultError):
    """The result backend failed while a result was awaited."""


class RemoteTaskError(CeleryBridgeError):
    """The remote task ran and failed.

    The remote exception is carried as data (``remote_type``, ``remote_message``,
    ``remote_traceback``): its class is never imported, whatever the result
    backend names (see CVE-2021-23727).
    """

    def __init__(
        self,
        task: str,
        version: int,
        task_id: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str | None,
        remote_module: str | None = None,
    ) -> None:
        self.task = task
        self.version = version
        self.task_id = task_id
        self.remote_type = remote_type
        self.remote_module = remote_module
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(
            f"task {task!r} v{version} ({task_id}) failed: {remote_type}: {remote_message}"
        )


class DeadLetteredError(RemoteTaskError):
    """The worker could not accept the message (unknown task or version, a body it cannot
    decode) and moved it, untouched, to ``<queue>.dead``; ``remote_message`` says why."""
