"""The ``celerybridge`` command line (click, as Celery's own)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click
from celery import Celery

from ._exceptions import CeleryBridgeError
from ._registry import registry
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
