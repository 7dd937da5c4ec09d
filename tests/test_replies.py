"""The replies an rpc:// result source keeps: final states only, the latest ones."""

from __future__ import annotations

import json

import pytest

from celerybridge import ResultBackendError
from celerybridge._constants import RPC_REPLY_MAX_BYTES
from celerybridge._transports._replies import Replies, decode_reply
from celerybridge._transports.base import TaskOutcome


def test_only_final_states_are_kept_and_the_oldest_go_first() -> None:
    replies = Replies(limit=2)
    for task_id in ("t1", "t2", "t3"):
        replies.expect(task_id)
    assert replies.add("t1", {"status": "STARTED", "result": None}) is None
    assert replies.add("t1", {"status": "PROGRESS", "result": {"step": 1}}) is None
    assert replies.get("t1") is None
    assert replies.add("t1", {"status": "SUCCESS", "result": 1}) == (
        "t1",
        TaskOutcome("SUCCESS", 1, None),
    )
    # Without a correlation id (an old Celery), the meta's own task id says whose it is.
    replies.add(None, {"status": "FAILURE", "result": {"exc_type": "E"}, "task_id": "t2"})
    replies.add("t3", {"status": "REVOKED", "result": None})
    assert len(replies) == 2
    assert replies.get("t1") is None  # the oldest went
    assert replies.get("t2") == TaskOutcome("FAILURE", {"exc_type": "E"}, None)
    assert replies.get("t3") is not None


def test_replies_are_kept_only_for_expected_tasks() -> None:
    replies = Replies(limit=10, expected=2)
    assert replies.add("forged", {"status": "SUCCESS", "result": 1}) is None
    for task_id in ("a", "b", "c"):  # "a", the oldest expectation, goes
        replies.expect(task_id)
    assert replies.add("a", {"status": "SUCCESS", "result": 1}) is None
    assert replies.add("c", {"status": "SUCCESS", "result": 3}) == (
        "c",
        TaskOutcome("SUCCESS", 3, None),
    )
    assert replies.add("c", {"status": "SUCCESS", "result": 4}) is None  # answered once
    assert len(replies) == 1


def test_a_compressed_or_oversized_reply_is_refused_unread() -> None:
    with pytest.raises(ResultBackendError, match="a compressed message"):
        decode_reply(b"x", "application/json", "utf-8", {"compression": "application/x-gzip"})
    with pytest.raises(ResultBackendError, match="at most 33,554,432 are read"):
        decode_reply(b" " * (RPC_REPLY_MAX_BYTES + 1), "application/json", "utf-8")


def test_a_reply_is_decoded_as_json_only() -> None:
    body = json.dumps({"status": "SUCCESS", "result": 3, "task_id": "t"}).encode()
    assert decode_reply(body, "application/json", "utf-8") == {
        "status": "SUCCESS",
        "result": 3,
        "task_id": "t",
    }
    assert decode_reply(b"[1]", "application/json", "utf-8") is None
    with pytest.raises(ResultBackendError, match="decoding a reply on the rpc:// reply queue"):
        decode_reply(b"\x80\x04K\x01.", "application/x-python-serialize", "binary")
