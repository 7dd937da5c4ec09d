"""The page at ``/`` in headless Chromium (Debian's, driven by Playwright): a save turns done,
with nothing in the console, the service named, the note shown and the columns in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from .._brokers import BROKERS, RESULT_BACKEND
from .._workers import ROOT
from ..pusher._s3server import free_port

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's own probe runs it: no sandbox as root, nothing fetched from the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def service_url(broker: str, tmp_path: Path) -> Iterator[str]:
    """Service A under uvicorn, as a separate process, like in production."""
    port = free_port()
    env = {
        **os.environ,
        "CELERYBRIDGE_BROKER_URL": BROKERS[broker],
        "CELERYBRIDGE_RESULT_BACKEND": RESULT_BACKEND,
        "SERVICE_A_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
    }
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app.service_a:app"]
    with (tmp_path / "uvicorn.log").open("wb") as log:
        server = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/items").raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "uvicorn.log").read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium package")
@pytest.mark.usefixtures("seed_queue_pusher")
async def test_a_saved_item_turns_done_on_the_page(service_url: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            problems: list[str] = []  # console errors, page errors, failed requests
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "response",
                lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
            )
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            await page.goto(service_url)
            await expect(page).to_have_title("Service A — items")
            await expect(page.locator("h1")).to_have_text("Service A — items")
            empty = page.locator("#items tr#empty")
            await expect(empty).to_have_text(
                "No items yet: save one above, and watch its backup here."
            )
            widths = await column_widths(page)

            await page.fill("input[name=name]", "<i>browser</i> lamp")  # shown as text
            await page.fill("input[name=quantity]", "3")
            await page.fill("input[name=note]", "M6, by the window")
            await page.click("button")
            row = page.locator("#items tr", has_text="<i>browser</i> lamp")
            await expect(row).to_have_count(1)
            await expect(empty).to_have_count(0)
            await expect(row.locator("td").nth(3)).to_have_text("M6, by the window")  # the note
            await expect(row.locator("td.state")).to_have_text("done", timeout=30_000)
            await expect(row).to_contain_text("service-a/items/")  # the receipt's key
            # A long receipt landed: the columns did not move.
            assert await column_widths(page) == widths
            await page.reload()  # a second load: still nothing asked for that is not there
            await expect(row.locator("td.state")).to_have_text("done")
            assert problems == []
        finally:
            await browser.close()


async def column_widths(page: Page) -> list[float]:
    """The rendered width of each header cell."""
    widths: list[float] = await page.eval_on_selector_all(
        "thead th", "cells => cells.map(c => c.getBoundingClientRect().width)"
    )
    assert len(widths) == 6
    return widths
