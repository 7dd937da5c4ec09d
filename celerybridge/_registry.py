"""The process-wide registry of contracts (version maps) and their implementations."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._exceptions import ContractError, UnknownTaskError, UnknownVersionError

if TYPE_CHECKING:
    from ._contracts import RemoteTask


@dataclass
class Contract:
    """All versions of one logical task, e.g. ``pusher.send_to_s3`` v1 and v2."""

    name: str
    versions: dict[int, RemoteTask[Any, Any]] = field(default_factory=dict)

    @property
    def default_version(self) -> int:
        """The version flagged ``default=True``, else the lowest one."""
        flagged = [v for v, stub in self.versions.items() if stub.default]
        return flagged[0] if flagged else min(self.versions)

    def get(self, version: int | str | None) -> RemoteTask[Any, Any]:
        """The stub of ``version`` (``None``: the default), or :class:`UnknownVersionError`."""
        if version is None:
            return self.versions[self.default_version]
        number = _parse_version(version)
        if number is None or number not in self.versions:
            raise UnknownVersionError(self.name, version, sorted(self.versions))
        return self.versions[number]


def _parse_version(version: object) -> int | None:
    # The seed passes versions as strings ("1", "2"); accept those and ints, nothing else.
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str) and version.strip().isdecimal():
        return int(version)
    return None


class Registry:
    """Contracts by logical name, and which functions implement which wire names."""

    def __init__(self) -> None:
        self._contracts: dict[str, Contract] = {}
        self._wire: dict[str, RemoteTask[Any, Any]] = {}
        self.implementations: dict[str, Callable[..., Any]] = {}

    def add(self, stub: RemoteTask[Any, Any]) -> None:
        """Register a stub, refusing clashes of version, wire name or default flag."""
        contract = self._contracts.get(stub.name) or Contract(stub.name)
        previous = contract.versions.get(stub.version)
        if previous is not None and previous.qualname != stub.qualname:
            raise ContractError(
                f"task {stub.name!r} v{stub.version} is declared twice: "
                f"by {previous.qualname} and by {stub.qualname}"
            )
        owner = self._wire.get(stub.wire_name)
        if owner is not None and (owner.name, owner.version) != (stub.name, stub.version):
            raise ContractError(
                f"wire name {stub.wire_name!r} of task {stub.name!r} v{stub.version} is already "
                f"used by task {owner.name!r} v{owner.version}"
            )
        others = [v for v, s in contract.versions.items() if s.default and v != stub.version]
        if stub.default and others:
            raise ContractError(
                f"task {stub.name!r}: versions {others[0]} and {stub.version} are both "
                "marked default=True"
            )
        contract.versions[stub.version] = stub
        self._contracts[stub.name] = contract
        self._wire[stub.wire_name] = stub

    def resolve(self, name: str, version: int | str | None = None) -> RemoteTask[Any, Any]:
        """The stub for ``name`` at ``version``, or a typed error saying what exists."""
        contract = self._contracts.get(name)
        if contract is None:
            names = list(self._contracts)
            raise UnknownTaskError(name, difflib.get_close_matches(name, names, n=3, cutoff=0.8))
        return contract.get(version)

    def by_wire_name(self, wire_name: str) -> RemoteTask[Any, Any] | None:
        """The stub sent under ``wire_name``, if any."""
        return self._wire.get(wire_name)

    def __iter__(self) -> Iterator[Contract]:
        return iter(sorted(self._contracts.values(), key=lambda c: c.name))

    def clear(self) -> None:
        """Forget everything (for tests)."""
        self._contracts.clear()
        self._wire.clear()
        self.implementations.clear()


registry = Registry()
"""The registry every ``@remote_task`` declaration lands in."""
