import subprocess
import sys

import celerybridge

from ._imports import loaded_by


def test_all_matches_what_is_public() -> None:
    public = {
        name
        for name, value in vars(celerybridge).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("celerybridge")
    }
    public.add("__version__")
    assert set(celerybridge.__all__) == public - {"fastapi"}
    assert celerybridge.__all__ == sorted(celerybridge.__all__)


def test_import_pulls_in_neither_aiobotocore_nor_fastapi() -> None:
    assert loaded_by("celerybridge") == []
    assert loaded_by("celerybridge.fastapi", ("fastapi",)) == ["fastapi"]


def test_import_leaves_celerys_tracer_unbound() -> None:
    # celery.worker.consumer binds celery.app.trace.build_tracer when imported: imported
    # before sentry_sdk.init, it would keep the unpatched tracer and the worker would
    # record no transactions. A worker imports it when it starts, as plain Celery does.
    worker_side = ("celery.worker.consumer", "celery.worker.consumer.consumer", "celery.app.trace")
    for module in ("celerybridge", "pusher", "pusher.bindings"):
        assert loaded_by(module, worker_side) == [], module


def test_fastapi_integration_names_the_extra_when_missing() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "try:\n    import celerybridge.fastapi\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "celerybridge.fastapi needs FastAPI: pip install 'celerybridge[fastapi]'"
    )
