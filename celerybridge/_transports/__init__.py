"""How messages reach a broker and how results come back: one module per implementation.

``base`` holds the two interfaces (:class:`Publisher`, :class:`ResultSource`);
``kombu`` is the portable implementation (Celery's own client, run in worker
threads); ``memory`` is the in-process test double.
"""
