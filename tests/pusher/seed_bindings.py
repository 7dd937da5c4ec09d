"""The seed's ``bindings.py``, verbatim: a plain Celery app and a ``pass``-bodied stub.

The broker is set by the test that uses it (the seed leaves the app's setup out).
"""

from celery import Celery

app = Celery("service_a")


@app.task(name="pusher.send_to_s3")
def send_to_s3(key, content):  # type: ignore[no-untyped-def]
    pass
