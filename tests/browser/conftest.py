"""Browser fixtures: Debian's Chromium driven by Playwright, against a real server and a real worker.

Chromium comes from Debian (`apt-get install chromium`, which `.ci/run` does), never from `playwright install`:
no browser build can be downloaded here. Without it (or without the playwright package) these tests skip,
saying why. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Server, link_copy, start_server
from tests.worker.conftest import Stack

CHROMIUM = os.environ.get("CONVLENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
API_KEY = "browser-test-key"

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can (test modules skip with this reason)."""
    if sync_playwright is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    return None


@dataclass
class Live:
    """The server (API key required for writes), its run store, and the worker on its embedded queue."""

    server: Server
    home: Path
    stack: Stack

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def live(trained_home: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A private copy of the trained store, served by uvicorn, with one Celery worker on the embedded queue."""
    base = tmp_path_factory.mktemp("browser")
    home = link_copy(trained_home, base / "home")
    stack = Stack(home, synthetic_data, broker_url=None, queue="train-browser")
    # The worker takes seconds to import torch and Celery: start it while the server starts.
    errors: list[BaseException] = []

    def start_worker() -> None:
        try:
            stack.worker()
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=start_worker)
    t.start()
    env = {"CONVLENS_QUEUE": stack.queue, "CONVLENS_API_KEY": API_KEY, "CONVLENS_TENSORBOARD": "false"}
    server: Server | None = None
    try:
        server = start_server(home, synthetic_data, env=env, log_dir=base)
        t.join()
        if errors:
            raise errors[0]
        yield Live(server, home, stack)
    finally:
        t.join()
        if server is not None:
            server.stop()
        stack.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope: sync_playwright runs an event loop in this thread until it exits; kept for the session it
    # would still run during later modules, whose asyncio.run() then fails.
    assert sync_playwright is not None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def page(browser: Browser, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (own storage) at laptop size; uncaught page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    pg.on("console", lambda m: problems.append(f"console.error: {m.text}") if _is_script_error(m) else None)
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        pg.screenshot(path=str(artifacts / f"FAILED-{request.node.name}.png"), full_page=True)
    context.close()
    assert not problems, problems


def _is_script_error(msg: Any) -> bool:
    """console errors from the page's own code; the browser's 'Failed to load resource' lines for the API's
    deliberate 4xx answers (a bad upload, a missing key) are expected and shown on the page instead."""
    return bool(msg.type == "error" and "Failed to load resource" not in msg.text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]


def wait_loaded(page: Any, selector: str, timeout: float = 30_000) -> None:
    """Every <img> the selector matches is shown and has loaded a picture of non-zero size (`page`: playwright's)."""
    page.wait_for_function(
        """sel => {
            const imgs = [...document.querySelectorAll(sel)];
            const ok = i => !i.hidden && i.complete && i.naturalWidth > 0 && i.naturalHeight > 0;
            return imgs.length > 0 && imgs.every(ok);
        }""",
        arg=selector,
        timeout=timeout,
    )
