"""The worker side: everything that runs inside a ``celery worker`` serving contracts.

- :mod:`.app`: ``celery_app`` and registering implementations of contracts;
- :mod:`.loop`: the process's persistent event loop and its resources;
- :mod:`.intake`: the gate every message passes before Celery reads it (shape,
  signature on receipt, replay);
- :mod:`.dead_letter`: where refused messages go;
- :mod:`.final_state`: a stored final result is never overwritten;
- :mod:`.redis_transport`: the kombu Redis transport that loses no message it takes;
- :mod:`.wakeup`: a signal wakes the consumer's event loop at once.

The caller side (``_bridge``, ``_transports``, ``_result``) imports nothing from here;
the wire format both sides share is ``_transports._protocol`` and ``_signing``.
"""
