"""``argsrepr`` and ``kwargsrepr``: our shortcut writes exactly what Celery's saferepr does."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from celerybridge._transports._repr import args_repr, kwargs_repr
from celerybridge._utils import uuid4_str


def celery(value: Any) -> str:
    return saferepr(value, 1024, maxlevels=3)  # as Celery's send_task calls it


# Spaces and quotes steer saferepr's truncation and escaping; long texts force truncation.
TEXT = st.text(alphabet=st.sampled_from("ab '\"\\\né"), max_size=1200) | st.text(max_size=40)
FLAT = TEXT | st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none()


@settings(max_examples=1000)
@given(st.lists(FLAT, max_size=30).map(tuple))
def test_flat_arguments_read_as_celery_writes_them(args: tuple[Any, ...]) -> None:
    assert args_repr(args) == celery(args)


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("x" * 1021,),
        ("x" * 1022,),
        ("x" * 1023,),
        ("x" * 1024,),
        ("a b" * 400,),
        ("x" * 1019, "y"),
        ("x" * 1020, 1),
        (1,) * 400,
        ("it's",),
    ],
)
def test_edges_of_the_1024_character_limit(args: tuple[Any, ...]) -> None:
    assert args_repr(args) == celery(args)


@pytest.mark.parametrize(
    "args",
    [
        ([1, 2], {"a": (3,)}),  # containers: Celery's own saferepr
        (b"bytes",),
        (uuid.UUID(int=1),),
    ],
)
def test_other_arguments_go_through_celerys_saferepr(args: tuple[Any, ...]) -> None:
    assert args_repr(args) == celery(args)


@pytest.mark.parametrize("kwargs", [{}, {"a": 1}, {"text": "x" * 2000}])
def test_keyword_arguments(kwargs: dict[str, Any]) -> None:
    assert kwargs_repr(kwargs) == celery(kwargs)


def test_uuid4_str_is_a_random_version_4_uuid() -> None:
    drawn = {uuid4_str() for _ in range(1000)}
    assert len(drawn) == 1000
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_uuid4_str_draws_afresh_in_a_forked_child() -> None:
    """Drawn a few kilobytes at a time: a child must not repeat its parent's next ids."""
    uuid4_str()  # the parent holds undrawn ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without pytest's teardown
        os.write(write, " ".join(uuid4_str() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {uuid4_str() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent


def test_uuid4_str_threads_draw_different_ids() -> None:
    drawn: list[list[str]] = [[] for _ in range(4)]

    def draw(into: list[str]) -> None:
        into.extend(uuid4_str() for _ in range(600))  # more than one draw of bytes each

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({text for into in drawn for text in into}) == 2400
