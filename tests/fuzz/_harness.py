"""Sending fuzz batches to a live pusher worker and checking what became of each message.

After each batch (:meth:`FuzzRun.batch`):

1. the worker is the process it was (same PID, running);
2. nothing ran that must not: no object under ``fuzz/<run>/bad/``, and no case that
   had to be refused landed;
3. each refused message is on ``<queue>.dead`` exactly once, with a reason
   (``x-celerybridge-dead-reason``) and a kind (``x-celerybridge-dead-kind``); a case
   that may run or be refused did one of the two; a valid one ran and was not refused;
   a refused message whose task id can be read has its task marked failed;
4. a good call (``Bridge`` + ``send_to_s3``) sent next lands within 5 s.

A crash or a wedge breaks every case after it in the batch, so the batch's cases are
sent again one at a time to a fresh worker (within a time budget) to find the ones that
do it; each violation is kept with the case and its wire, for ``python -m tests.fuzz.repro``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis
from anyio.from_thread import BlockingPortal

from celerybridge import Bridge, CeleryBridgeError
from celerybridge._constants import (
    DEAD_KIND_HEADER,
    DEAD_REASON_HEADER,
    RESULT_KEY_PREFIX,
    STATE_FAILURE,
)
from celerybridge._signing import Signer
from celerybridge._worker.intake.envelope import envelope_refusal
from pusher.bindings import send_to_s3

from .._brokers import RESULT_BACKEND
from ._fates import DEAD_KINDS, MARKER, Fate, Target, case_number, empty_raw, is_uuid, raw_reason
from ._model import MAX_DEPTH, MAX_MESSAGE_BYTES, Case, Ctx, Recipe, nests_deeper
from ._report import Figures, Violation
from ._wire import Broker, DeadEntry, redis_entry, text_of
from .strategies import build, signature_refusal

GOOD_CALL_SECONDS = 5.0
_REMOTE_SHUTDOWN = "Got shutdown from remote"
_RECEIVED = re.compile(r"Task \S+\[(\S+)\] received")


class FuzzRun:
    """One target fuzzed batch after batch; :attr:`figures` and :attr:`violations`."""

    def __init__(
        self,
        target: Target,
        s3: Any,
        bucket: str,
        portal: BlockingPortal,
        *,
        settle_seconds: float,
        isolate_seconds: float,
        repro_dir: Path,
        label: str,
    ) -> None:
        self.target, self.s3, self.bucket, self.portal = target, s3, bucket, portal
        self.settle_seconds, self.isolate_budget = settle_seconds, isolate_seconds
        self.repro_dir = repro_dir
        self.run = uuid.uuid4().hex[:6]
        self.broker = Broker(target.broker, target.broker_url)
        self.results = redis.Redis.from_url(RESULT_BACKEND)
        self.fates: dict[int, Fate] = {}
        self.figures = Figures(label=label, run=self.run)
        self.violations: list[Violation] = []
        self._next = 0
        self._seen_bad: set[str] = set()
        self._received_ids: set[str] = set()
        self._log_path: Path | None = None
        self._log_offset = 0
        self._since = self._bad_since = 1
        options = {"broker_url": target.broker_url, "result_backend": RESULT_BACKEND}
        if target.signing_key is not None:
            options["signing_key"] = target.signing_key
        self.bridge = portal.call(lambda: _bridge(options))

    # -- one batch ----------------------------------------------------------------------

    def batch(self, recipes: Iterable[Recipe]) -> None:
        worker = self.target.up()
        assert worker.process is not None
        pid = worker.process.pid
        cases = [self._build(recipe) for recipe in recipes]
        started = time.monotonic()
        for case in cases:
            self._send(case)
        self._settle(cases, self.settle_seconds, lambda: worker.running)
        self.figures.settle_seconds.append(time.monotonic() - started)
        latency = self._good_call("batch")
        time.sleep(0.3)  # late forbidden runs, late duplicates
        self._collect()
        self.figures.batches += 1
        self.figures.seconds += time.monotonic() - started
        crashed = not worker.running or worker.process.pid != pid
        for case in cases:
            self._judge(self.fates[case.n], broken=crashed or latency is None)
        self._check_bad_prefix()
        self._forget(cases[0].n if cases else self._next + 1)
        if crashed and _REMOTE_SHUTDOWN in worker.log()[-20_000:]:
            # Celery's remote control (a broadcast on the broker's pidbox, which no fuzz
            # message reaches): another test session on the shared broker shut it down.
            self.figures.count("remote-control shutdowns (not a fuzz message)")
            self.target.up(fresh=True)
            return
        if crashed or latency is None:
            what = "crash" if crashed else "wedge"
            self.figures.count(what)
            state = (
                f"worker exited with {worker.process.poll()}"
                if crashed
                else "worker alive, but the good call did not land"
            )
            self.violations.append(
                Violation(
                    1 if crashed else 4,
                    what,
                    f"batch {self.figures.batches} ({len(cases)} messages)",
                    f"{state}; log tail:\n{worker.log()[-3000:]}",
                )
            )
            self.target.up(fresh=True)
            self._isolate(cases)

    # -- building and sending -----------------------------------------------------------

    def _build(self, recipe: Recipe) -> Case:
        self._next += 1
        return self._rebuild_as(recipe, self._next)

    def _rebuild(self, case: Case) -> Case:
        return self._rebuild_as(case.recipe, case.n)

    def _rebuild_as(self, recipe: Recipe, n: int) -> Case:
        ctx = Ctx(
            self.run,
            n,
            self.target.queue,
            self.target.broker,
            self.target.signer,
            Signer("other-" + "fedcba9876543210" * 3, 300),
        )
        return build(recipe, ctx)

    def _send(self, case: Case) -> None:
        fate = self.fates.setdefault(case.n, Fate(case))
        for _ in range(case.copies):
            problem = self.broker.send(case.wire, self.target.queue)
            if problem is not None:
                fate.unsendable = problem
                return
            fate.sent += 1

    # -- watching -----------------------------------------------------------------------

    def _settle(self, cases: list[Case], timeout: float, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            self._collect()
            if all(self.fates[c.n].settled() for c in cases):
                return
            time.sleep(0.1)

    def _collect(self) -> None:
        """Take the dead letters, see what landed."""
        for entry in self.broker.take_dead(self.target.dead_queue):
            self._attribute(entry, None)
        for other in (f"{self.target.queue}-elsewhere", f"{self.target.queue}-victim"):
            for entry in self.broker.take_dead(f"{other}.dead"):
                self._attribute(entry, f"{other}.dead")
        if self.target.broker == "redis":
            for shared in ("celery.dead", "pusher.dead"):
                self._peek_shared(shared)
        for key in self._listed():
            n = case_number(key, self.run)
            if n is not None and n in self.fates and "-l" not in key.rsplit("/", 1)[-1]:
                self.fates[n].landed = True
        received = self._received()
        for fate in self.fates.values():
            task_id = fate.case.task_id
            if fate.case.expect == "either" and task_id and not fate.ran and not fate.dead:
                meta = self._meta(task_id)
                result = meta.get("result") if isinstance(meta, dict) else None
                dead_lettered = (
                    isinstance(result, dict) and result.get("exc_type") == "DeadLettered"
                )
                # Celery's own tasks store no result (ignore_result): the log says they ran.
                fate.executed = (meta is not None and not dead_lettered) or task_id in received

    def _received(self) -> set[str]:
        """Ids of the tasks the worker logged as received (read on from where it stopped)."""
        worker = self.target.worker
        if worker is None or worker.log_path is None:
            return self._received_ids
        if worker.log_path != self._log_path:
            self._log_path, self._log_offset = worker.log_path, 0
        with worker.log_path.open("rb") as log:
            log.seek(self._log_offset)
            text = log.read()
        text = text[: text.rfind(b"\n") + 1]  # whole lines: the last may be half written
        self._log_offset += len(text)
        for match in _RECEIVED.finditer(text.decode("utf-8", "replace")):
            self._received_ids.add(match[1])
        return self._received_ids

    def _attribute(self, entry: DeadEntry, misrouted_to: str | None) -> None:
        number = self._case_of(entry)
        if number is not None and number < self._since:
            self.figures.count("late dead letters of cases already judged")
            return
        if number is None and not entry.body.strip():  # an empty entry cannot name its case
            number = next(
                (n for n, f in self.fates.items() if empty_raw(f) and not f.settled()), None
            )
        if number is None or number not in self.fates:
            if number is None and not MARKER.search(entry.text()):
                self.figures.count("orphan dead letters")
            else:
                self.figures.count("dead letters of embedded calls")
            return
        fate = self.fates[number]
        if misrouted_to is not None:
            reason = entry.headers.get(DEAD_REASON_HEADER) or raw_reason(entry)
            fate.misrouted.append(f"{misrouted_to}: {reason}")
        else:
            fate.dead.append(entry)

    def _case_of(self, entry: DeadEntry) -> int | None:
        """The case a dead letter belongs to, or ``None`` for a call the worker made itself
        (an embedded callback or chain step: a fresh id, the case's as ``parent_id``).

        Its own id names it first; else its body (not as an embedded call's key); else
        anything in its headers."""
        headers = entry.headers
        task_id, parent = headers.get("id"), headers.get("parent_id")
        if isinstance(task_id, str) and (n := self._named(task_id)) is not None:
            return n
        if isinstance(parent, str) and self._named(parent) is not None and is_uuid(task_id):
            return None
        body = entry.body.decode("latin-1")
        own = {int(m[2]) for m in MARKER.finditer(body) if m[1] == self.run and not m[3]}
        if own:
            return min(own)
        if any(m[1] == self.run for m in MARKER.finditer(body)):
            return None  # only embedded calls' keys: a dead letter of one of those
        return self._named(text_of(headers))

    def _named(self, text: str) -> int | None:
        numbers = [int(m[2]) for m in MARKER.finditer(text) if m[1] == self.run]
        return min(numbers) if numbers else None

    def _peek_shared(self, queue: str) -> None:
        """Dead letters of this run on a shared queue (read without taking others')."""
        client = self.broker.redis()
        entries: Any = client.lrange(queue, 0, -1)
        for raw in entries:
            if f"fz{self.run}n".encode() in raw:
                client.lrem(queue, 1, raw)
                self._attribute(DeadEntry({}, bytes(raw)), queue)

    def _listed(
        self, folders: Iterable[str] = ("bad", "either", "ok"), since: int = 0
    ) -> list[str]:
        """Keys of cases numbered ``since`` or more (all cases still followed by default)
        in these folders: listing only those keeps a long run's listings short."""
        since = since or self._since
        keys: list[str] = []
        pages = self.s3.get_paginator("list_objects_v2")
        for folder in folders:
            prefix = f"fuzz/{self.run}/{folder}/"
            after = f"{prefix}fz{self.run}n{since - 1:06d}"
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, StartAfter=after):
                keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _forget(self, first: int) -> None:
        """Stop following the cases before ``first`` (judged: their wires, megabytes
        some, need not stay in memory); a late dead letter of one is only counted."""
        self._bad_since, self._since = self._since, first
        for n in [n for n in self.fates if n < first]:
            del self.fates[n]

    # -- the good call --------------------------------------------------------------------

    def _good_call(self, tag: str) -> float | None:
        """Seconds a valid call took to land, or ``None`` after 5 s (then waits 25 s more
        to tell a slow worker from a wedged one)."""
        key = f"fuzz/{self.run}/good/{tag}-{uuid.uuid4().hex[:8]}"
        stub = send_to_s3.with_options(queue=self.target.queue)
        began = time.monotonic()
        try:
            handle = self.portal.call(_send, self.bridge, stub, key)
        except CeleryBridgeError as exc:
            self.figures.good_failures.append(f"not sent: {exc}")
            return None
        try:
            self.portal.call(_result, handle, GOOD_CALL_SECONDS)
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except (CeleryBridgeError, TimeoutError) as exc:
            try:
                self.portal.call(_result, handle, 25.0)
                late = f"landed after {time.monotonic() - began:.1f} s"
            except (CeleryBridgeError, TimeoutError):
                late = "not after 30 s either"
            self.figures.good_failures.append(f"{type(exc).__name__}: {exc}; {late}")
            return None
        latency = time.monotonic() - began
        self.figures.good_latency.append(latency)
        return latency

    # -- judging --------------------------------------------------------------------------

    def _judge(self, fate: Fate, broken: bool) -> None:
        case = fate.case
        family = self.figures.family(case.family)
        if fate.unsendable is not None:
            family["unsendable"] += 1
            return
        family["sent"] += fate.sent
        family[f"expect {case.expect}"] += fate.sent
        dead = len(fate.dead)
        family["dead-lettered"] += dead
        family["ran"] += int(fate.ran)
        for entry in fate.dead:
            self.figures.kinds[case.family][str(entry.headers.get(DEAD_KIND_HEADER))] += 1
        problems: list[tuple[int, str, str]] = []
        if case.expect == "refuse" and fate.landed:
            problems.append((2, "forbidden run", f"{case.key} was written"))
        expected_dead = {"refuse": fate.sent, "run": 0, "once": fate.sent - 1}.get(case.expect)
        if case.expect == "either":
            # A call failing the contract is dead-lettered after it ran: it wrote nothing.
            no_fate = dead == 0 and not fate.ran and not fate.misrouted
            if dead > 1 or (dead == 1 and fate.landed) or no_fate:
                what = (
                    "landed and was dead-lettered" if dead else "neither ran nor was dead-lettered"
                )
                problems.append((3, "no single fate", f"{what} ({dead} dead letters)"))
        elif dead != expected_dead and not (dead == 0 and fate.misrouted):
            kind = "lost" if dead < (expected_dead or 0) else "extra dead letters"
            problems.append(
                (3, kind, f"{dead} dead letters for {fate.sent} sent, {expected_dead} expected")
            )
        if case.expect in ("run", "once") and not fate.landed:
            problems.append((3, "valid call did not run", f"{case.key} not written"))
        if fate.misrouted:
            problems.append((3, "misrouted dead letter", f"dead-lettered to {fate.misrouted}"))
        for entry in fate.dead:
            reason = entry.headers.get(DEAD_REASON_HEADER)
            dead_kind = entry.headers.get(DEAD_KIND_HEADER)
            if not (isinstance(reason, str) and reason) or dead_kind not in DEAD_KINDS:
                detail = f"reason {reason!r}, kind {dead_kind!r}"
                problems.append((3, "dead letter without reason or kind", detail))
        if case.expect == "refuse" and dead and self._markable(case):
            assert case.task_id is not None
            state = self._state(case.task_id)
            if state != STATE_FAILURE:
                problems.append((3, "task not marked failed", f"{case.task_id}: {state}"))
        if broken:
            # After a crash or wedge, missing fates are its consequence: isolation decides.
            problems = [p for p in problems if p[0] == 2 or p[1] == "misrouted dead letter"]
        for invariant, what, detail in problems:
            family[what] += 1
            self._violation(invariant, what, case, detail, fate)

    def _markable(self, case: Case) -> bool:
        """Whether the gate must mark this refused case's task failed: its id is intact
        and the message is authentic (no key on the worker, or its signature is good and
        its content passed the checks made before the signature's), and it was not
        refused as a raw entry (on Redis, larger than a message can be)."""
        wire = case.wire
        if case.task_id is None or not isinstance(wire.headers, dict):
            return False
        if nests_deeper(wire.headers, MAX_DEPTH):
            return False  # headers that cannot be read are not trusted for an id
        if self.target.broker == "redis":
            entry = redis_entry(wire, self.target.queue)
            if envelope_refusal(entry, MAX_MESSAGE_BYTES) is not None:
                return False  # dead-lettered raw, as it came: nothing read from it
        if self.target.signer is None:
            return True
        encoding = wire.content_encoding
        return (
            signature_refusal(self.target.signer, wire, self.target.broker) is None
            and wire.content_type == "application/json"
            and isinstance(encoding, str)
            and encoding.lower() in ("utf-8", "utf8", "binary")
            and wire.headers.get("compression") is None
            and len(wire.body) <= MAX_MESSAGE_BYTES
        )

    def _check_bad_prefix(self) -> None:
        """Nothing under ``bad/``: from the cases of the batch before this one on, so a
        late run of a case already judged is still seen."""
        for key in self._listed(("bad",), since=self._bad_since):
            if key in self._seen_bad:
                continue
            self._seen_bad.add(key)
            n = case_number(key, self.run)
            fate = self.fates.get(n) if n is not None else None
            if fate is not None and key == fate.case.key and fate.landed:
                continue  # judged already as a forbidden run of its case
            self.figures.count("forbidden runs found late or of embedded calls")
            if fate is not None:
                self._violation(2, "forbidden embedded run", fate.case, f"{key} was written", fate)
            else:
                self.violations.append(
                    Violation(
                        2, "forbidden run", f"case #{n} (an earlier batch)", f"{key} was written"
                    )
                )

    def _state(self, task_id: str) -> str | None:
        meta = self._meta(task_id)
        return None if meta is None else str(meta.get("status"))

    def _meta(self, task_id: str) -> dict[str, Any] | None:
        raw = self.results.get(RESULT_KEY_PREFIX + task_id)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return {"status": "unreadable"}
        return meta if isinstance(meta, dict) else {"status": "unreadable"}

    def _violation(
        self, invariant: int, what: str, case: Case, detail: str, fate: Fate | None
    ) -> None:
        reasons = sorted(
            {str(e.headers.get(DEAD_REASON_HEADER))[:160] for e in (fate.dead if fate else [])}
        )
        repro = self._save(case)
        self.violations.append(
            Violation(invariant, what, case.describe(), f"{detail}; reasons {reasons}", str(repro))
        )

    def _save(self, case: Case) -> Path:
        self.repro_dir.mkdir(parents=True, exist_ok=True)
        path = self.repro_dir / f"{case.marker}.json"
        document = {
            "broker": self.target.broker,
            "signed": self.target.signer is not None,
            "case": case.describe(),
            "expect": case.expect,
            "copies": case.copies,
            "wire": case.wire.to_json(),
        }
        path.write_text(json.dumps(document, indent=1))
        return path

    # -- isolating crashes and wedges -----------------------------------------------------

    def _isolate(self, cases: list[Case]) -> None:
        """Send ``cases`` one at a time to a fresh worker: which of them crash or wedge it."""
        deadline = time.monotonic() + self.isolate_budget
        for case in cases:
            if time.monotonic() > deadline:
                self.figures.count("cases left unisolated")
                continue
            worker = self.target.up()
            assert worker.process is not None
            pid = worker.process.pid
            self.fates.pop(case.n, None)
            case = self._rebuild(case)  # for the new queue: embedded calls name it
            self._send(case)
            self._settle([case], 5.0, lambda w=worker: w.running)  # type: ignore[misc]
            crashed = not worker.running or worker.process.pid != pid
            latency = None if crashed else self._good_call(f"isolate-{case.n}")
            if crashed or latency is None:
                what = "crash" if crashed else "wedge"
                self.figures.family(case.family)[what] += 1
                self._violation(
                    1 if crashed else 4,
                    what,
                    case,
                    "alone, on a fresh worker; log tail:\n" + worker.log()[-2000:],
                    self.fates.get(case.n),
                )
                self.target.up(fresh=True)

    def close(self) -> None:
        self.portal.call(self.bridge.aclose)
        for queue in [*self.target.old_queues, self.target.queue]:
            self.broker.purge(queue, f"{queue}.dead")
        self.broker.close()
        self.results.close()


def _bridge(options: dict[str, Any]) -> Bridge:
    return Bridge(publish_timeout=10, result_timeout=30, **options)


async def _send(bridge: Bridge, stub: Any, key: str) -> Any:
    return await bridge.send(stub, (key, '{"good": true}'), {})


async def _result(handle: Any, timeout: float) -> Any:
    return await handle.result(timeout=timeout)
