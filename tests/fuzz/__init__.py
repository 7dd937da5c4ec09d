"""A fuzz suite for the worker intake: mutated task messages and raw broker entries sent to
live pusher workers on Redis and RabbitMQ (see ``test_fuzz.py`` and ``_harness.py``)."""
