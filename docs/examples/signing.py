"""Signing settings: the key comes from the environment, never shows, and is checked early.

No broker is needed: building settings and a worker's Celery app connects nothing.
"""

from __future__ import annotations

import os
import secrets

from celerybridge import BridgeSettings, ConfigurationError, celery_app

# Stands in for your deployment's secret store, which sets the variable for every process.
os.environ["CELERYBRIDGE_SIGNING_KEY"] = secrets.token_urlsafe(32)

# --8<-- [start:settings]
settings = BridgeSettings()  # CELERYBRIDGE_SIGNING_KEY, CELERYBRIDGE_SIGNING_MAX_AGE...
assert settings.signing_key is not None
assert settings.signing_max_age == 300  # seconds, the default
# The key never shows: not in repr, not in logs, not in error messages.
assert "signing_key=SecretStr('**********')" in repr(settings)
assert os.environ["CELERYBRIDGE_SIGNING_KEY"] not in repr(settings)

# A worker built from the same settings runs only messages signed with this key.
app = celery_app("pusher", settings)
# --8<-- [end:settings]
app.close()

# --8<-- [start:short-key]
try:
    BridgeSettings(signing_key="change-me")
except ConfigurationError as exc:
    assert str(exc) == (
        "invalid celerybridge settings: CELERYBRIDGE_SIGNING_KEY (signing_key): a signing key "
        "needs at least 32 characters; make one with: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )
else:
    raise AssertionError("a short key was accepted")
# --8<-- [end:short-key]
print("signing settings: ok")
