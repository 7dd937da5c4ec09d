"""The pusher's errors: the upload branch of the celerybridge tree.

::

    CeleryBridgeError
    └── UploadError                  an upload did not land
        ├── PermanentUploadError     retrying cannot help (no bucket, access denied, bad key)
        └── TransientUploadError     throttling, 5xx, resets, timeouts: retried with backoff
"""

from __future__ import annotations

from celerybridge import CeleryBridgeError


class UploadError(CeleryBridgeError):
    """An upload to S3 did not land."""


class PermanentUploadError(UploadError):
    """An upload failed in a way retrying cannot fix; the task fails at once."""


class TransientUploadError(UploadError):
    """An upload failed in a way that may pass; the task is retried with backoff."""
