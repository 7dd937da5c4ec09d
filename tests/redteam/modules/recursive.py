"""A contract and an implementation on two different recursive models."""

from __future__ import annotations

from celery import Celery
from pydantic import BaseModel

from celerybridge import remote_task

app = Celery("rt_recursive", set_as_current=False)


class Node(BaseModel):
    value: int
    children: list[Node] = []


class Tree(BaseModel):
    value: int
    children: list[Tree] = []
    label: str | None = None


@remote_task(name="rt.tree", queue="rt")
def tree(root: Node) -> int: ...


@tree.implement(app)
def tree_impl(root: Tree) -> int:
    return root.value
