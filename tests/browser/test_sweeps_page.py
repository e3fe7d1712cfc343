"""The page's Sweeps and Compare sections in a real browser (Debian's Chromium) against a live server and worker:
a sweep started from the form fills its table in live, shows its figures, shows the API's 422 and is cancelled;
two models compared through the 202s, with the numbers the API gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import API_KEY, Live, browser_missing, wait_loaded

if (why := browser_missing()) is not None:
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Page, Response, ViewportSize, expect  # noqa: E402

from tests.helpers import wait_for  # noqa: E402

expect.set_options(timeout=30_000)
pytestmark = pytest.mark.slow  # a real browser against a real server and worker
PHONE: ViewportSize = {"width": 390, "height": 844}
# One epoch of 4 steps on the synthetic data, each logged.
TINY = {"epochs": 1, "batch_size": 50, "train_limit": 200, "val_size": 50, "log_every": 1, "milestones": []}
KEY = {"X-API-Key": API_KEY}


def pct(v: float | None) -> str:
    """As the page writes a share."""
    return "" if v is None else f"{v * 100:.1f}%"


def start_sweep(page: Page, sweep_id: str, base: dict[str, Any], grid: str | dict[str, Any], preset: str = "") -> None:
    page.select_option("#sweep-preset", preset)
    page.fill("#sweep-id", sweep_id)
    page.fill("#sweep-base", json.dumps(base))
    page.fill("#sweep-grid", grid if isinstance(grid, str) else json.dumps(grid))
    page.click("#sweep-submit")


def sweep_done(url: str, sweep_id: str) -> dict[str, Any] | None:
    table = httpx.get(f"{url}/sweeps/{sweep_id}").json()
    return table if all(r["status"] in ("succeeded", "failed", "cancelled") for r in table["rows"]) else None


def test_sweep_live_table_figures_errors_and_cancel(page: Page, live: Live, artifacts: Path) -> None:
    page.goto(live.url + "/")
    expect(page.locator("#sweeps-list tbody")).to_contain_text("No sweep yet")
    page.fill("#api-key", API_KEY)

    # The form's own check (JSON that does not parse), then the API's 422 naming the field: nothing queued.
    start_sweep(page, "bad", TINY, '{"seed": [1, 2]')
    expect(page.locator("#sweep-form-err")).to_contain_text("grid: not JSON")
    start_sweep(page, "bad", TINY, {"learning_rate": [0.1]})
    expect(page.locator("#sweep-form-err")).to_contain_text("grid.learning_rate")
    assert httpx.get(live.url + "/sweeps").json()["total"] == 0

    # A real sweep: its table appears at once and fills in live until every row has succeeded.
    start_sweep(page, "ui", TINY, {"seed": [1, 2]})
    expect(page.locator("#sweep-form-msg")).to_have_text("Sweep ui is queued: 2 rows.")
    expect(page.locator("#sweep-form-err")).to_be_empty()
    expect(page.locator("#sweep-title")).to_have_text("Sweep ui")
    expect(page.locator("#sweep-table thead th")).to_have_count(9)  # Row, seed, Status, ..., Worker
    expect(page.locator("#sweep-table thead th").nth(1)).to_have_text("seed")
    for rid in ("ui-00", "ui-01"):
        row = page.locator(f"#sweep-table tr[data-run='{rid}']")
        expect(row).to_have_attribute("data-status", "succeeded", timeout=180_000)
    api = httpx.get(live.url + "/sweeps/ui").json()
    for r in api["rows"]:
        cells = page.locator(f"#sweep-table tr[data-run='{r['id']}'] td")
        expect(cells.nth(0)).to_have_text(str(r["values"]["seed"]))
        expect(cells.nth(4)).to_have_text(pct(r["test_acc"]))
    expect(page.locator("#sweep-status")).to_contain_text("2 succeeded")
    expect(page.locator("#sweep-cancel")).to_be_hidden()  # nothing left to cancel
    expect(page.locator("#sweeps-list tr[data-sweep='ui']")).to_contain_text("2 succeeded")
    wait_loaded(page, "#sweep-curves")
    wait_loaded(page, "#sweep-table-img")
    page.locator("#sweeps").screenshot(path=str(artifacts / "sweep.png"))

    # A long sweep, cancelled: the running row stops at its next step, the queued one at once.
    start_sweep(page, "ui-long", {**TINY, "epochs": 50}, {"seed": [1, 2]})
    expect(page.locator("#sweep-title")).to_have_text("Sweep ui-long")
    page.get_by_role("button", name="Cancel the sweep").click()
    for rid in ("ui-long-00", "ui-long-01"):
        row = page.locator(f"#sweep-table tr[data-run='{rid}']")
        expect(row).to_have_attribute("data-status", "cancelled", timeout=90_000)
    expect(page.locator("#sweep-cancel")).to_be_hidden()

    # Back to the first one from the list.
    page.get_by_role("button", name="Show sweep ui", exact=True).click()
    expect(page.locator("#sweep-title")).to_have_text("Sweep ui")
    expect(page.locator("#sweep-table tbody tr")).to_have_count(2)


def test_compare_two_models(page: Page, live: Live, artifacts: Path) -> None:
    rows = [{"seed": 1}, {"seed": 2}, {"dataset": "cifar100"}]
    r = httpx.post(live.url + "/sweeps", json={"id": "cmp", "base": TINY, "rows": rows}, headers=KEY)
    assert r.status_code == 202, r.text
    done = wait_for(lambda: sweep_done(live.url, "cmp"), 240, "sweep cmp to finish", 0.5)
    assert done is not None and done["counts"] == {"succeeded": 3}, done

    statuses: list[int] = []

    def seen(res: Response) -> None:
        if "/compare?" in res.url and "format=png" not in res.url:
            statuses.append(res.status)

    page.on("response", seen)
    page.goto(live.url + "/")
    expect(page.locator("#compare-a option[value='cmp-01']")).to_have_count(1)
    page.select_option("#compare-a", "cmp-00")
    page.select_option("#compare-b", "cmp-01")
    page.select_option("#compare-split", "val")
    page.click("#compare-submit")
    result = page.locator("#compare-result")
    expect(result).to_have_attribute("data-models", "cmp-00,cmp-01", timeout=120_000)
    assert statuses[0] == 202 and statuses[-1] == 200, statuses  # computed in the background, polled

    api = httpx.get(live.url + "/compare", params={"models": "cmp-00,cmp-01", "split": "val"}).json()
    summary = page.locator("#compare-summary")
    expect(summary.locator("[data-item=n]")).to_contain_text(f"{api['n']} (")
    expect(summary.locator("[data-item=acc-a]")).to_have_text(pct(api["accuracy"]["a"]))
    expect(summary.locator("[data-item=acc-b]")).to_have_text(pct(api["accuracy"]["b"]))
    expect(summary.locator("[data-item=agreement]")).to_have_text(pct(api["agreement"]))
    for cell, value in api["table"].items():
        expect(page.locator(f"#compare-table td[data-cell={cell}]")).to_have_text(str(value))
    expect(page.locator("#compare-table th[scope=row]").first).to_have_text("cmp-00 right")
    expect(page.locator("#compare-per-class tbody tr")).to_have_count(len(api["per_class"]))
    differ = [d["class"] for d in api["differ_most"]]
    expect(page.locator("#compare-differ tbody th")).to_have_text(differ)
    wait_loaded(page, "#compare-img")
    expect(page.locator("#compare-progress")).to_be_hidden()
    page.locator("#compare").screenshot(path=str(artifacts / "compare.png"))

    # A model with itself agrees everywhere; models of two datasets are the API's 422, said on the page.
    page.select_option("#compare-b", "cmp-00")
    page.click("#compare-submit")
    expect(result).to_have_attribute("data-models", "cmp-00,cmp-00", timeout=120_000)
    expect(summary.locator("[data-item=agreement]")).to_have_text("100.0%")
    page.select_option("#compare-b", "cmp-02")
    page.click("#compare-submit")
    expect(page.locator("#compare-err")).to_contain_text("only models of one dataset compare")
    expect(result).to_be_hidden()

    # A phone's width: nothing in these sections is wider than the screen.
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page is {width}px wide at phone width"
