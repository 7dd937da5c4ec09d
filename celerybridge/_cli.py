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
from ._config import BROKER_SCHEMES, BridgeSettings, url_problem
from ._constants import DEAD_FROM_HEADER
from ._dead_letter import dead_letter_queue
from ._exceptions import CeleryBridgeError
from ._registry import registry
from ._signing import Signer
from ._utils import printable
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
_p = printable  # everything a dlq command prints that it did not write itself


def _broker(url: str | None) -> str:
    """The broker URL to use, checked as the settings check it: kombu's errors for a
    malformed URL quote the part they could not read, maybe a password."""
    if url:
        problem = url_problem(url, BROKER_SCHEMES)
        if problem is not None:
            raise click.ClickException(f"--broker: {problem}")
        return url
    try:
        return BridgeSettings().broker_url
    except CeleryBridgeError as exc:
        raise click.ClickException(_p(exc)) from exc


@contextmanager
def _clean_errors() -> Iterator[None]:
    try:
        yield
    except CeleryBridgeError as exc:
        raise click.ClickException(_p(f"{type(exc).__name__}: {exc}")) from exc


def _dead(queue: str) -> str:
    return _p(dead_letter_queue(queue))


@dlq.command("list")
@click.argument("queue")
@_broker_option
def dlq_list(queue: str, broker: str | None) -> None:
    """List QUEUE's dead letters (id, task, reason), leaving them where they are.

    Entries that are not messages are listed as garbage (size, first bytes) and kept.
    Control characters and backslashes are escaped as in a Python string.
    """
    with _clean_errors():
        entries = _dlq.list_dead_letters(_broker(broker), queue)
    garbage = 0
    for entry in entries:
        if isinstance(entry, _dlq.Garbage):
            garbage += 1
            click.echo(f"-\tgarbage\t{entry.describe()}")  # printable as it is
        else:
            click.echo(f"{_p(entry.task_id)}\t{_p(entry.task)}\t{_p(entry.reason)}")
    counted = f"{len(entries) - garbage} dead letter(s)"
    if garbage:
        counted += f" and {garbage} garbage entr{'y' if garbage == 1 else 'ies'}"
    click.echo(f"{counted} on {_dead(queue)}", err=True)


@dlq.command("show")
@click.argument("queue")
@click.argument("task_id")
@_broker_option
def dlq_show(queue: str, task_id: str, broker: str | None) -> None:
    """Print one dead letter of QUEUE as JSON: reason, kind, headers, body.

    TASK_ID is the id as it is or as `list` prints it (escaped).
    """
    with _clean_errors():
        entries = _dlq.list_dead_letters(_broker(broker), queue)
    found = [e for e in entries if isinstance(e, _dlq.DeadLetter) and e.named_by({task_id})]
    if not found:
        raise click.ClickException(f"no dead letter {_p(task_id)} on {_dead(queue)}")
    if len(found) > 1:
        click.echo(f"{len(found)} dead letters have this id; showing the oldest", err=True)
    click.echo(json.dumps(found[0].describe(), indent=2, default=str, ensure_ascii=True))


@dlq.command("replay")
@click.argument("queue")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter of QUEUE.")
@click.option(
    "--to",
    "to",
    metavar="QUEUE",
    help="Send them to this queue instead of QUEUE (never where their headers say).",
)
@click.option(
    "--sign",
    is_flag=True,
    help="Sign them afresh with CELERYBRIDGE_SIGNING_KEY (you vouch for their content).",
)
@_broker_option
def dlq_replay(
    queue: str,
    task_ids: tuple[str, ...],
    everything: bool,
    to: str | None,
    sign: bool,
    broker: str | None,
) -> None:
    """Send dead letters (TASK_IDS, or --all) back to QUEUE, where they were refused (or
    to --to), with their retries reset (with --sign, signed now: a worker with the key
    refuses expired signatures).

    --all --sign does not re-sign, nor replay, letters refused for their signature or as
    replays: name such a letter's id to vouch for it. Garbage stays where it is.
    """
    if bool(task_ids) == everything:
        raise click.UsageError("give task ids or --all (not both)")
    if to is not None and (not to or to == dead_letter_queue(queue)):
        raise click.UsageError(f"--to must name a queue other than {_dead(queue)}")
    signer = None
    if sign:
        with _clean_errors():
            signer = Signer.from_settings(BridgeSettings())
        if signer is None:
            raise click.UsageError("--sign needs the key in CELERYBRIDGE_SIGNING_KEY")
    with _clean_errors():
        report = _dlq.replay(
            _broker(broker), queue, None if everything else task_ids, signer, to=to
        )
    target = to or queue
    for letter in report.replayed:
        line = f"replayed {_p(letter.task_id)} ({_p(letter.task)}) to {_p(target)}"
        if letter.source != queue:  # reported, never followed
            line += f"; its {DEAD_FROM_HEADER} header names {_p(letter.source)}, not {_p(queue)}"
        click.echo(line)
    for letter, why in report.skipped:
        click.echo(f"skipped {_p(letter.task_id)} ({_p(letter.task)}): {_p(why)}", err=True)
    for garbage in report.garbage:
        click.echo(f"kept garbage on {_dead(queue)}: {garbage.describe()}", err=True)
    problems = []
    if report.missing:
        problems.append(f"not on {_dead(queue)}: {', '.join(_p(i) for i in report.missing)}")
    if task_ids and report.skipped:
        problems.append(f"not replayed: {', '.join(_p(x.task_id) for x, _ in report.skipped)}")
    if problems:
        raise click.ClickException("; ".join(problems))


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_broker_option
def dlq_purge(queue: str, yes: bool, broker: str | None) -> None:
    """Drop every entry of QUEUE's dead-letter queue, garbage included."""
    if not yes:
        click.confirm(f"Drop every message on {_dead(queue)}?", abort=True)
    with _clean_errors():
        dropped = _dlq.purge(_broker(broker), queue)
    click.echo(f"purged {dropped} dead letter(s) from {_dead(queue)}")
