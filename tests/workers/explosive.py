"""An exception a task raises, importable on the caller's side too: a caller that rebuilt
remote failures as exceptions would import this module and count an instance."""

from __future__ import annotations


class Explosive(Exception):
    """Counts its instances in the process that makes them."""

    instances = 0

    def __init__(self, *args: object) -> None:
        Explosive.instances += 1
        super().__init__(*args)
