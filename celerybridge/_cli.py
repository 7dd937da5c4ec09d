"""The ``celerybridge`` command line (click, as Celery's own)."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NoReturn

import click
from celery import Celery
from celery.app.utils import find_app

from . import _call, _dlq
from ._asyncapi import document
from ._bridge import Bridge
from ._check import check_implementation
from ._config import BROKER_SCHEMES, BridgeSettings, client_transport_options, url_problem
from ._constants import DEAD_FROM_HEADER, DEAD_KIND_DELIVERIES
from ._exceptions import CeleryBridgeError, ConfigurationError
from ._registry import registry
from ._schema import describe
from ._signing import Signer
from ._utils import printable
from ._worker.dead_letter import dead_letter_queue


def _import_module(name: str) -> ModuleType:
    """The module ``name`` (``proj.worker:app``: ``proj.worker``) names, imported; when
    ``proj.worker.app`` is no module, ``proj.worker``. Errors raised while importing are
    the user's to see: Celery's ``find_app`` would take an ``AttributeError`` for "no
    app" and drop the ``ImportError`` of a package's ``celery`` module."""
    module, colon, _ = name.partition(":")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        parent = module.rpartition(".")[0]
        if colon or exc.name != module or not parent:
            raise
    return _import_module(parent)  # `proj.worker.app`: an attribute of proj.worker


def _load(name: str) -> Any:
    """Import ``name`` and find its Celery app as ``celery -A`` does (``None``: no app)."""
    module = _import_module(name)
    if (
        ":" not in name
        and getattr(module, "__path__", None) is not None
        and not isinstance(getattr(module, "app", None), Celery)
        and not isinstance(getattr(module, "celery", None), Celery)
        and importlib.util.find_spec(f"{module.__name__}.celery") is not None
    ):
        importlib.import_module(f"{module.__name__}.celery")  # its errors, not find_app's
    try:
        return find_app(name)
    except AttributeError:  # imported, but no app in it: bindings, say
        return None


def _import(modules: Iterable[str]) -> list[Celery]:
    """Import ``modules`` and find their Celery apps the way ``celery -A`` does
    (``pusher`` finds ``pusher.celery:app``); a module without an app is imported all
    the same (bindings). An error raised while importing is a ``ClickException`` (exit
    code 1) that names it."""
    if "." not in sys.path:
        sys.path.insert(0, ".")
    apps: list[Celery] = []
    for name in modules:
        try:
            app = _load(name)
        except CeleryBridgeError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except ImportError as exc:
            raise click.ClickException(f"cannot import {exc.name or name}: {exc}") from exc
        except Exception as exc:  # the module's own bug: named, without a traceback
            raise click.ClickException(
                _p(f"cannot import {name}: {type(exc).__name__}: {exc}")
            ) from exc
        if isinstance(app, Celery) and app not in apps:
            apps.append(app)
    return apps


def _plain_tasks(apps: Iterable[Celery]) -> dict[str, Callable[..., Any]]:
    """Task bodies registered on ``apps``, by task name."""
    bodies: dict[str, Callable[..., Any]] = {}
    for app in apps:
        for name, task in app.tasks.items():
            bodies.setdefault(name, task.run)
    return bodies


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


@click.group()
@click.version_option(package_name="celerybridge")
def main() -> None:
    """Typed contracts between services that talk over Celery."""


@main.command()
@click.argument("modules", nargs=-1, required=True)
@click.option(
    "--allow-missing", is_flag=True, help="Do not fail on versions with no implementation."
)
@click.option(
    "--strict", is_flag=True, help="Fail on types it cannot compare, too (UNCHECKED lines)."
)
def check(modules: tuple[str, ...], allow_missing: bool, strict: bool) -> None:
    """Check that every contract version in MODULES has an implementation that fits it:
    one that takes its arguments (positionally and by keyword) and whose parameter and
    return annotations agree with the contract's, compared as JSON Schema.

    MODULES are imported (bindings and workers alike), and their Celery apps found as
    `celery -A` finds them: `check pusher` reads `pusher.celery:app`. Implementations
    are `@stub.implement` functions and plain `@app.task(name=...)` tasks of those
    apps. Exits 1 on a mismatch, a missing version, or when MODULES declare no contract
    or implement none (and with --strict, on types it cannot compare).
    """
    plain = _plain_tasks(_import(modules))
    contracts = list(registry)
    if not contracts:
        raise click.ClickException(
            f"no contract found in {', '.join(modules)}; name the bindings module(s) that "
            "declare them, or a worker module that imports them"
        )
    failed = implemented = False
    for contract in contracts:
        for version, stub in sorted(contract.versions.items()):
            fn = registry.implementations.get(stub.wire_name) or plain.get(stub.wire_name)
            label = f"{contract.name} v{version} ({stub.wire_name}, queue {stub.queue})"
            if fn is None:
                failed |= not allow_missing
                click.echo(f"MISSING   {label}: no implementation")
                continue
            implemented = True
            findings = check_implementation(stub, fn)
            for finding in findings:
                failed |= finding.ok is False or strict
                mark = "MISMATCH " if finding.ok is False else "UNCHECKED"
                click.echo(f"{mark} {label}: {finding.text}")
            if not findings:
                click.echo(f"ok        {label}")
    if not implemented:
        raise click.ClickException(
            f"no implementation found in {', '.join(modules)}; name the worker's module "
            "or app too (as for celery -A)"
        )
    if failed:
        sys.exit(1)


@main.command()
@click.argument("modules", nargs=-1, required=True)
@click.option(
    "--format",
    "form",
    type=click.Choice(["json", "asyncapi"]),
    default="json",
    show_default=True,
    help="json: a list of contract versions with JSON Schemas; asyncapi: AsyncAPI 3.0.",
)
@click.option("--title", default="celerybridge contracts", help="asyncapi: info.title.")
@click.option("--api-version", default="1", help="asyncapi: info.version.")
def contracts(modules: tuple[str, ...], form: str, title: str, api_version: str) -> None:
    """Print the contracts declared in MODULES, as their calls travel.

    Each version's positional arguments are a JSON array (`args`, with `prefixItems`),
    its keyword-only arguments an object (`kwargs`), and its result `returns`: JSON
    Schema 2020-12, bytes as base64 strings. With --format asyncapi, an AsyncAPI 3.0
    document: a channel per queue, a message per version in Celery's protocol 2 envelope.
    """
    _import(modules)
    if form == "asyncapi":
        out: Any = document(registry, title=title, version=api_version)
    else:
        out = [
            describe(stub, default=version == contract.default_version)
            for contract in registry
            for version, stub in sorted(contract.versions.items())
        ]
    click.echo(json.dumps(out, indent=2))


def _finite_timeout(
    ctx: click.Context, param: click.Parameter, value: float | None
) -> float | None:
    # FloatRange lets NaN through: every comparison with NaN is false.
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number of seconds")
    return value


def _call_failed(exc: CeleryBridgeError) -> NoReturn:
    click.echo(f"Error: {_p(f'{type(exc).__name__}: {exc}')}", err=True)
    sys.exit(_call.exit_code(exc))


def _json_argument(what: str, text: str) -> Any:
    try:
        return _call.parse_json(text, what)
    except _call.BadJSON as exc:
        raise click.UsageError(_p(exc)) from None


def _send_options(texts: tuple[str, ...], queue: str | None) -> dict[str, Any]:
    """``--option NAME=JSON`` texts as a dict of decoded values (usage errors: exit 2)."""
    options: dict[str, Any] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise click.UsageError(_p(f"--option {text!r}: expected NAME=JSON, e.g. countdown=5"))
        if name in options or (name == "queue" and queue is not None):
            raise click.UsageError(_p(f"--option {name}: given more than once"))
        options[name] = _json_argument(f"--option {name}", value)
    return options


@main.command()
@click.argument("name")
@click.argument("args", nargs=-1)
@click.option(
    "-m",
    "--module",
    "modules",
    multiple=True,
    required=True,
    help="A bindings module that declares NAME (repeatable), e.g. pusher.bindings.",
)
@click.option("--kwargs", "kwargs_json", help="Keyword arguments as one JSON object.")
@click.option("--version", "version", type=click.IntRange(min=1), help="Contract version.")
@click.option("--queue", help="Send to this queue instead of the contract's.")
@click.option(
    "--option",
    "option_texts",
    multiple=True,
    metavar="NAME=JSON",
    help="A send option (repeatable), as with_options takes it: countdown=5, priority=3, "
    'expires=60, eta=\'"2031-01-01T00:00:00+00:00"\', headers=\'{"k": "v"}\', task_id=\'"id"\'.',
)
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=86400),
    callback=_finite_timeout,
    help="--wait: seconds to wait (default: CELERYBRIDGE_RESULT_TIMEOUT).",
)
@click.option("--dry-run", is_flag=True, help="Validate and print the message; send nothing.")
@_broker_option
def call(
    name: str,
    args: tuple[str, ...],
    modules: tuple[str, ...],
    kwargs_json: str | None,
    version: int | None,
    queue: str | None,
    option_texts: tuple[str, ...],
    wait: bool,
    timeout: float | None,
    dry_run: bool,
    broker: str | None,
) -> None:
    """Validate the task NAME with ARGS (each one JSON text: '"items/1.json"', 3,
    '{"a": "b"}'; bytes as base64), send it, and print JSON: the task id, and with
    --wait its result. Settings (broker, result backend) are CELERYBRIDGE_*'s.

    Exit codes: 0 done; 1 a module cannot be imported; 2 usage (bad JSON); 3 refused
    before sending (unknown task or version, arguments that do not fit); 4 the broker did
    not accept it; 5 the task failed; 6 no result within the timeout; 7 the result
    backend failed; 8 settings (--broker included) and bad option values.
    """
    if broker is not None:
        problem = url_problem(broker, BROKER_SCHEMES)
        if problem is not None:  # a setting given on the command line: exit code 8
            _call_failed(ConfigurationError(f"--broker: {problem}"))
    _import(modules)
    positional = [_json_argument(f"argument {i + 1}", text) for i, text in enumerate(args)]
    keywords = {} if kwargs_json is None else _json_argument("--kwargs", kwargs_json)
    if not isinstance(keywords, dict):
        raise click.UsageError("--kwargs must be a JSON object")
    options = _send_options(option_texts, queue)
    try:
        prepared = _call.prepare(
            name, positional, keywords, version=version, queue=queue, options=options
        )
        if dry_run:
            shown = {**prepared.describe(), **prepared.wire()}
            if options:
                shown["options"] = options
            click.echo(json.dumps(shown, indent=2))
            return
        overrides: dict[str, Any] = {} if broker is None else {"broker_url": broker}

        async def run() -> tuple[dict[str, Any], CeleryBridgeError | None]:
            async with Bridge(**overrides) as bridge:
                return await _call.send(prepared, bridge, wait=wait, timeout=timeout)

        out, error = asyncio.run(run())
    except CeleryBridgeError as exc:
        _call_failed(exc)
    click.echo(json.dumps(out, indent=2))
    if error is not None:
        _call_failed(error)


@main.group()
def dlq() -> None:
    """Dead letters: what workers could not accept, on <queue>.dead.

    The broker is CELERYBRIDGE_BROKER_URL unless --broker says otherwise.
    """


@contextmanager
def _clean_errors() -> Iterator[None]:
    try:
        yield
    except CeleryBridgeError as exc:
        raise click.ClickException(_p(f"{type(exc).__name__}: {exc}")) from exc


def _dead(queue: str) -> str:
    return _p(dead_letter_queue(queue))


def _dlq_broker(broker: str | None) -> tuple[str, dict[str, Any]]:
    """The broker URL and the transport options the bridge and workers use with it
    (``CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS``: Sentinel's master name, a key prefix)."""
    url = _broker(broker)
    try:
        settings = BridgeSettings(broker_url=url)
    except CeleryBridgeError as exc:
        raise click.ClickException(_p(exc)) from exc
    return url, client_transport_options(settings)


@dlq.command("list")
@click.argument("queue")
@_broker_option
def dlq_list(queue: str, broker: str | None) -> None:
    """List QUEUE's dead letters (id, task, kind, reason), leaving them where they are.

    Entries that are not messages are listed as garbage (size, first bytes) and kept;
    on Redis, so are entries still on QUEUE.dead.held (set apart raw, not yet wrapped
    by a worker). Control characters and backslashes are escaped as in a Python string.
    """
    url, options = _dlq_broker(broker)
    with _clean_errors():
        entries = _dlq.list_dead_letters(url, queue, options)
    garbage = 0
    for entry in entries:
        if isinstance(entry, _dlq.Garbage):
            garbage += 1
            click.echo(f"-\tgarbage\t-\t{entry.describe()}")  # printable as it is
        else:
            kind = _p(entry.kind) or "-"
            click.echo(f"{_p(entry.task_id)}\t{_p(entry.task)}\t{kind}\t{_p(entry.reason)}")
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
    url, options = _dlq_broker(broker)
    with _clean_errors():
        entries = _dlq.list_dead_letters(url, queue, options)
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
    "--kind",
    "kinds",
    multiple=True,
    metavar="KIND",
    help=f"With --all, only letters of this kind (repeatable); --kind {DEAD_KIND_DELIVERIES} "
    "is the only way --all replays those.",
)
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
    kinds: tuple[str, ...],
    to: str | None,
    sign: bool,
    broker: str | None,
) -> None:
    """Send dead letters (TASK_IDS, or --all) back to QUEUE, where they were refused (or
    to --to), with their retries reset (with --sign, signed now: a worker with the key
    refuses expired signatures).

    --all --sign does not re-sign, nor replay, letters refused for their signature or as
    replays: name such a letter's id to vouch for it. --all skips letters of kind
    deliveries (delivered more than CELERYBRIDGE_MAX_DELIVERIES times: they may kill a
    worker again) unless --kind deliveries asks for them or their id is named. Garbage
    stays where it is.
    """
    if bool(task_ids) == everything:
        raise click.UsageError("give task ids or --all (not both)")
    if kinds and not everything:
        raise click.UsageError("--kind goes with --all")
    if to is not None and (not to or to == dead_letter_queue(queue)):
        raise click.UsageError(f"--to must name a queue other than {_dead(queue)}")
    signer = None
    if sign:
        with _clean_errors():
            signer = Signer.from_settings(BridgeSettings())
        if signer is None:
            raise click.UsageError("--sign needs the key in CELERYBRIDGE_SIGNING_KEY")
    url, options = _dlq_broker(broker)
    with _clean_errors():
        report = _dlq.replay(
            url,
            queue,
            None if everything else task_ids,
            signer,
            to=to,
            options=options,
            kinds=kinds,
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
    """Drop every entry of QUEUE's dead-letter queue, garbage included (on Redis, what
    QUEUE.dead.held holds too)."""
    url, options = _dlq_broker(broker)
    if not yes:
        click.confirm(f"Drop every message on {_dead(queue)}?", abort=True)
    with _clean_errors():
        dropped = _dlq.purge(url, queue, options)
    click.echo(f"purged {dropped} dead letter(s) from {_dead(queue)}")
