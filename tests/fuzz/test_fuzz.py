"""Fuzzing a live pusher worker: mutated Celery task messages and raw broker entries,
sent to ``celery -A pusher worker`` on Redis and RabbitMQ, with and without a signing key.

Hypothesis draws each batch (a list of recipes, see ``strategies.py``); the harness
sends it, then checks the invariants (``_harness.py``). A broken invariant is recorded,
not raised inside hypothesis: the worker is a live system whose state outlasts an
example, so hypothesis' shrinking and its replay of a failing example would send other
messages to another state. The harness isolates the message that crashed or wedged the
worker itself, by sending the batch again one message at a time to a fresh worker.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from ._harness import FuzzRun
from ._report import Violation
from .conftest import LONG, SCALE
from .strategies import recipes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(7200 if LONG else 180),
]


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "keyed"])
def test_a_pusher_survives_malformed_messages(
    fuzz_run: Callable[[str, bool], FuzzRun], broker: str, keyed: bool
) -> None:
    run = fuzz_run(broker, keyed)
    batches = SCALE.keyed_batches if keyed else SCALE.batches
    batch = st.lists(recipes(broker, keyed), min_size=SCALE.batch, max_size=SCALE.batch)  # type: ignore[arg-type]

    @settings(
        max_examples=batches,
        deadline=None,
        derandomize=not LONG,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(batch)
    def fuzz(recipes: list[object]) -> None:
        broken = run.figures.totals["crash"] + run.figures.totals["wedge"]
        if broken >= SCALE.max_breaks or run.figures.totals["harness errors"]:
            return  # the worker keeps breaking: the isolated cases say why
        try:
            run.batch(recipes)  # type: ignore[arg-type]
        except Exception as exc:  # a harness error: record it, never let hypothesis replay
            run.figures.count("harness errors")
            run.violations.append(Violation(0, "harness error", repr(exc), traceback.format_exc()))

    if SCALE.seed is not None:
        fuzz = seed(SCALE.seed)(fuzz)
    fuzz()
    assert run.figures.batches, "no batch was sent"
    assert not run.violations, f"{len(run.violations)} violations:\n" + "\n".join(
        v.describe() for v in run.violations[:30]
    )
