"""The pusher: a service that backs up serialised models to S3, as in the seed.

Callers install the bindings and delegate::

    from pusher.bindings import send_to_s3
    receipt = await (await send_to_s3.delegate("items/1.json", payload))

The worker is started exactly as the seed says (Celery finds ``pusher.celery.app``)::

    celery -A pusher worker -Q pusher --loglevel=info

This package imports nothing heavy: ``import pusher.bindings`` never loads aiobotocore.
"""
