"""A worker module whose optional dependency (its extra) is not installed."""

import rt_dependency_not_installed  # noqa: F401  (the worker's extra is missing)
from celery import Celery

from .bindings import dep

app = Celery("rt_pkgdep", set_as_current=False)


@dep.implement(app)
def dep_impl(x: int) -> int:
    return x
