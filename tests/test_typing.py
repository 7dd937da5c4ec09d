"""mypy, run as a user runs it: on a module outside this repository that calls the shipped
pusher bindings, through the stubs' typed ``delegate`` and ``via(bridge).delegate``.

One mypy run checks both files (each run costs seconds): ``good.py`` must pass,
``bad.py`` must fail on exactly the marked lines. Without ``pusher/py.typed`` mypy
skips the bindings (``import-untyped``) and ``bad.py``'s calls pass as ``Any``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GOOD = """
from typing import assert_type

from celerybridge import Bridge, TaskHandle
from pusher.bindings import Receipt, send_to_s3, send_to_s3_v2, send_to_s3_v3


async def calls(bridge: Bridge) -> None:
    handle = await send_to_s3.delegate("items/1.json", "{}")
    assert_type(handle, TaskHandle[Receipt])
    assert_type(await handle, Receipt)
    v2 = await send_to_s3_v2.via(bridge).delegate("items/2.json", "{}", {"owner": "a"})
    assert_type(await v2.result(timeout=5), Receipt)
    v3 = send_to_s3_v3.via(bridge).delegate("a.bin", b"\\x00", content_type="image/png")
    assert_type(await (await v3), Receipt)
    send_to_s3.delay(key="items/3.json", content="{}")
"""

BAD = """
from celerybridge import Bridge
from pusher.bindings import send_to_s3, send_to_s3_v2, send_to_s3_v3


async def calls(bridge: Bridge) -> None:
    await send_to_s3.delegate("items/1.json", 123)  # E: arg-type
    await send_to_s3_v3.delegate("a.bin", "text, not bytes")  # E: arg-type
    await send_to_s3_v2.via(bridge).delegate("items/2.json", "{}")  # E: call-arg
    await send_to_s3.via(bridge).delegate("k", "c", colour="red")  # E: call-arg
    await send_to_s3_v2.delegate("k", "c", {"owner": 1})  # E: dict-item
    size: str = (await (await send_to_s3.delegate("k", "c"))).size  # E: assignment
    send_to_s3.delay("k", b"bytes")  # E: arg-type
"""

ERROR = re.compile(r"^(?P<file>\w+\.py):(?P<line>\d+): error: .* \[(?P<code>[a-z-]+)\]$")


def expected_errors(source: str) -> set[tuple[int, str]]:
    return {
        (number, line.rsplit("# E: ", 1)[1])
        for number, line in enumerate(source.splitlines(), start=1)
        if "# E: " in line
    }


def test_mypy_checks_calls_of_the_shipped_pusher_bindings(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "good.py",
            "bad.py",
        ],
        cwd=tmp_path,  # outside the repository: no project configuration, no overrides
        capture_output=True,
        text=True,
        timeout=100,
    )
    found: dict[str, set[tuple[int, str]]] = {"good.py": set(), "bad.py": set()}
    unparsed = []
    for line in done.stdout.splitlines():
        match = ERROR.match(line)
        if match is None:
            if ": note: " not in line:
                unparsed.append(line)
            continue
        found.setdefault(match["file"], set()).add((int(match["line"]), match["code"]))
    assert not unparsed, done.stdout + done.stderr
    assert found == {"good.py": set(), "bad.py": expected_errors(BAD)}, done.stdout
    assert done.returncode == 1
