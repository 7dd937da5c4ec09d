"""The asyncio pool: ``-c N`` coroutine tasks in flight in one worker process.

- :mod:`.pool`: the Celery pool class, ``celerybridge.AsyncioPool``;
- :mod:`.greenlets`: Celery's tracer in a greenlet on the loop thread, awaiting
  without blocking;
- :mod:`.context`: Celery's request context keyed by job, right across awaits;
- :mod:`.callbacks`: Celery's callbacks run on the consumer's thread;
- :mod:`.limits`: soft and hard time limits of coroutine jobs;
- :mod:`.fatal`: the process exits when its event loop is lost;
- :mod:`.plain_async`: plain Celery ``async def`` tasks run on the loop;
- :mod:`.watchdog`: a blocking call inside a coroutine task is reported.

Nothing is imported here: :mod:`celerybridge._worker.loop` uses :mod:`.greenlets`, and
:mod:`.pool` uses the loop.
"""
