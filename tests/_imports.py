"""What importing a module pulls in, seen from a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("aiobotocore", "botocore", "aiohttp", "fastapi")


def loaded_by(module: str, candidates: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``candidates`` are in ``sys.modules`` after ``import module``."""
    code = (
        f"import json, sys, {module}; "
        f"print(json.dumps(sorted(m for m in {candidates!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))
