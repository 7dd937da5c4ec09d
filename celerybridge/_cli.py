"""The ``celerybridge`` command line (click, as Celery's own)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from celery import Celery

from . import _dlq
from ._config import BridgeSettings
from ._exceptions import CeleryBridgeError
from ._registry import registry
from ._signing import Signer
from ._validation import arguments_schema, result_schema
from ._worker import check_signature


def _import(modules: Iterable[str]) -> list[Any]:
    sys.path.insert(0, ".")
    try:
        return [importlib.import_module(name) for name in modules]
    except CeleryBridgeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    except ImportError as exc:
        raise click.ClickException(f"cannot import {exc.name or exc}: {exc}") from exc


def _plain_tasks(modules: Iterable[Any]) -> dict[str, Callable[..., Any]]:
    """Task bodies registered on Celery apps found in ``modules``, by task name."""
    bodies: dict[str, Callable[..., Any]] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Celery):
                for name, task in value.tasks.items():
                    bodies.setdefault(name, task.run)
    return bodies


@click.group()
@click.version_option(package_name="celerybridge")
def main() -> None:
    """Typed contracts between services that talk over Celery."""


@main.command()
@click.argument("modules", nargs=-1, required=True)
@click.option(
    "--allow-missing", is_flag=True, help="Do not fail on versions with no implementation."
)
def check(modules: tuple[str, ...], allow_missing: bool) -> None:
    """Check that every contract version in MODULES has a compatible implementation.

    MODULES are imported (bindings and workers alike). Implementations are found
    among ``@stub.implement`` functions and plain ``@app.task(name=...)`` tasks of
    Celery apps defined in MODULES. Exits 1 on any mismatch or missing version.
    """
    imported = _import(modules)
    plain = _plain_tasks(imported)
    failed = False
    for contract in registry:
        for version, stub in sorted(contract.versions.items()):
            fn = registry.implementations.get(stub.wire_name) or plain.get(stub.wire_name)
            label = f"{contract.name} v{version} ({stub.wire_name}, queue {stub.queue})"
            if fn is None:
                failed |= not allow_missing
                click.echo(f"MISSING   {label}: no implementation")
                continue
            problem = check_signature(stub, fn)
            failed |= problem is not None
            click.echo(f"MISMATCH  {label}: {problem}" if problem else f"ok        {label}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("modules", nargs=-1, required=True)
def contracts(modules: tuple[str, ...]) -> None:
    """Print the contracts declared in MODULES as JSON Schema."""
    _import(modules)
    out = []
    for contract in registry:
        for version, stub in sorted(contract.versions.items()):
            out.append(
                {
                    "name": contract.name,
                    "version": version,
                    "wire_name": stub.wire_name,
                    "queue": stub.queue,
                    "default": version == contract.default_version,
                    "deprecated": stub.deprecated,
                    "arguments": arguments_schema(stub.binder),
                    "returns": result_schema(stub.binder),
                }
            )
    click.echo(json.dumps(out, indent=2))


@main.group()
def dlq() -> None:
    """Dead letters: what workers could not accept, on <queue>.dead.

    The broker is CELERYBRIDGE_BROKER_URL unless --broker says otherwise.
    """


_broker_option = click.option("--broker", help="Broker URL (default: CELERYBRIDGE_BROKER_URL).")


def _broker(url: str | None) -> str:
    try:
        return url or BridgeSettings().broker_url
    except CeleryBridgeError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _clean_errors() -> Iterator[None]:
    try:
        yield
    except CeleryBridgeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@dlq.command("list")
@click.argument("queue")
@_broker_option
def dlq_list(queue: str, broker: str | None) -> None:
    """List QUEUE's dead letters (id, task, reason), leaving them where they are."""
    with _clean_errors():
        letters = _dlq.list_dead_letters(_broker(broker), queue)
    for letter in letters:
        click.echo(f"{letter.task_id}\t{letter.task}\t{letter.reason}")
    click.echo(f"{len(letters)} dead letter(s) on {queue}.dead", err=True)


@dlq.command("show")
@click.argument("queue")
@click.argument("task_id")
@_broker_option
def dlq_show(queue: str, task_id: str, broker: str | None) -> None:
    """Print one dead letter of QUEUE as JSON: reason, headers, body."""
    with _clean_errors():
        letters = _dlq.list_dead_letters(_broker(broker), queue)
    found = [letter for letter in letters if letter.task_id == task_id]
    if not found:
        raise click.ClickException(f"no dead letter {task_id} on {queue}.dead")
    click.echo(json.dumps(found[0].describe(), indent=2, default=str))


@dlq.command("replay")
@click.argument("queue")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter of QUEUE.")
@click.option(
    "--sign",
    is_flag=True,
    help="Sign them afresh with CELERYBRIDGE_SIGNING_KEY (you vouch for their content).",
)
@_broker_option
def dlq_replay(
    queue: str, task_ids: tuple[str, ...], everything: bool, sign: bool, broker: str | None
) -> None:
    """Send dead letters (TASK_IDS, or --all) back to the queue they came from, as they were
    (or, with --sign, signed now: a worker with the key refuses expired signatures)."""
    if bool(task_ids) == everything:
        raise click.UsageError("give task ids or --all (not both)")
    signer = None
    if sign:
        with _clean_errors():
            signer = Signer.from_settings(BridgeSettings())
        if signer is None:
            raise click.UsageError("--sign needs the key in CELERYBRIDGE_SIGNING_KEY")
    with _clean_errors():
        replayed = _dlq.replay(_broker(broker), queue, None if everything else task_ids, signer)
    for letter in replayed:
        click.echo(f"replayed {letter.task_id} ({letter.task}) to {letter.source}")
    missing = set(task_ids) - {letter.task_id for letter in replayed}
    if missing:
        raise click.ClickException(f"not on {queue}.dead: {', '.join(sorted(missing))}")


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_broker_option
def dlq_purge(queue: str, yes: bool, broker: str | None) -> None:
    """Drop every dead letter of QUEUE."""
    if not yes:
        click.confirm(f"Drop every message on {queue}.dead?", abort=True)
    with _clean_errors():
        dropped = _dlq.purge(_broker(broker), queue)
    click.echo(f"purged {dropped} dead letter(s) from {queue}.dead")
