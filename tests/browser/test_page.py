"""The web page in a real browser (Debian's Chromium) against a live server and worker: predict, look inside,
errors, training with live curves that survive a reload, models, and Swagger UI's "Try it out"."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import API_KEY, Live, browser_missing, wait_loaded

if (why := browser_missing()) is not None:
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Page, Route, expect  # noqa: E402

from models.data import load_cifar  # noqa: E402
from tests.helpers import png_bytes  # noqa: E402

expect.set_options(timeout=30_000)
pytestmark = pytest.mark.slow  # a real browser against a real server and worker
PHONE = {"width": 390, "height": 844}


def sample_png(synthetic_data: Path, index: int) -> bytes:
    """A synthetic CIFAR-10 test image as PNG bytes."""
    ds = load_cifar(synthetic_data, "cifar10", train=False)
    return png_bytes(ds.images[index].permute(1, 2, 0).numpy())


def natural_size(page: Page, selector: str) -> tuple[int, int]:
    w, h = page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]")
    return int(w), int(h)


def points(page: Page, canvas: str) -> int:
    return int(page.get_attribute(canvas, "data-points") or 0)


def fill_job(page: Page, run_id: str, epochs: int) -> None:
    """A tiny job on the synthetic data: 4 steps an epoch, each one logged."""
    fields = {"epochs": epochs, "batch_size": 50, "train_limit": 200, "val_size": 50, "log_every": 1}
    for name, value in {**fields, "milestones": "", "run_id": run_id}.items():
        page.locator(f"#train-form [name={name}]").fill(str(value))


def test_predict_and_look_inside(page: Page, live: Live, synthetic_data: Path, artifacts: Path) -> None:
    page.goto(live.url + "/")
    # A gallery of real test images from the configured dataset: click one, get its prediction.
    thumbs = page.locator("#gallery .thumb")
    expect(thumbs.first).to_be_visible()
    assert thumbs.count() >= 10
    wait_loaded(page, "#gallery .thumb img")
    thumbs.nth(3).click()
    expect(page.locator("#current-cap")).to_contain_text("true class")
    expect(page.locator("#predict-bars li")).to_have_count(5)

    # Upload an image: the bars are the API's answer for the same bytes, and say which model answered.
    png = sample_png(synthetic_data, 7)
    api = httpx.post(live.url + "/predict?top_k=5", files={"files": ("seven.png", png, "image/png")}).json()
    page.set_input_files("#file-input", files=[{"name": "seven.png", "mimeType": "image/png", "buffer": png}])
    expect(page.locator("#current-cap")).to_contain_text("seven.png")
    top = api["predictions"][0]["top_k"]
    expect(page.locator("#predict-bars li").first).to_have_attribute("data-class", top[0]["name"])
    expect(page.locator("#predict-bars li .prob").first).to_have_text(f"{top[0]['probability'] * 100:.1f}%")
    expect(page.locator("#predict-model")).to_have_text(f"Answered by model {api['model']}.")

    # Look inside: both filter figures, the feature maps and the projection grid load as real pictures.
    for sel in ("#filters-channels", "#filters-rgb", "#featuremaps", "#projections"):
        wait_loaded(page, sel)
        w, h = natural_size(page, sel)
        assert w > 0 and h > 0, sel
    chips = page.locator("#channel-buttons .chip")
    expect(chips).to_have_count(16)  # layer2, top:16

    # A channel: its projection large beside the input, and its top-9 dataset examples with projections.
    channel = chips.first.get_attribute("data-channel")
    chips.first.click()
    expect(page.locator("#channel-h")).to_have_text(f"Channel {channel} of layer2")
    expect(page.locator("#topk .hit")).to_have_count(9, timeout=90_000)
    wait_loaded(page, "#topk .hit img")
    wait_loaded(page, "#channel-projection")
    w, h = natural_size(page, "#channel-projection")
    assert w > 2 * h * 0.9, "the input and the projection side by side"

    # Explanations as an overlay, with a method picker.
    wait_loaded(page, "#explain-img")
    page.select_option("#explain-form select[name=method]", "saliency")
    expect(page.locator("#explain-cap")).to_contain_text("saliency")
    wait_loaded(page, "#explain-img")

    # Changing a control (keyboard-usable <select>) redraws the projections for another layer.
    page.focus("#inside-form select[name=layer]")
    page.select_option("#inside-form select[name=layer]", "conv1")
    expect(page.locator("#channel-detail")).to_be_hidden()
    wait_loaded(page, "#projections")
    page.screenshot(path=str(artifacts / "look-inside.png"), full_page=True)

    # A phone's width: one column, nothing wider than the screen.
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page is {width}px wide at phone width"
    page.screenshot(path=str(artifacts / "phone.png"), full_page=True)


def test_invalid_upload_shows_the_api_error(page: Page, live: Live, artifacts: Path) -> None:
    bad = b"this is a text file, not an image"
    answer = httpx.post(live.url + "/predict", files={"files": ("notes.png", bad, "image/png")})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    page.goto(live.url + "/")
    page.set_input_files("#file-input", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": bad}])
    expect(page.locator("#predict-err")).to_have_text(detail)
    expect(page.locator("#predict-bars li")).to_have_count(0)
    expect(page.locator("#featuremaps-panel .error")).not_to_be_empty()
    page.screenshot(path=str(artifacts / "invalid-upload.png"), full_page=False)


def test_swagger_ui_try_it_out_on_predict(page: Page, live: Live, synthetic_data: Path, artifacts: Path) -> None:
    """/docs renders from this server alone (Swagger UI's files are bundled: no CDN) and "Try it out" on
    POST /predict answers 200. Any request leaving the server fails the test."""
    outside: list[str] = []

    def refuse(route: Route) -> None:
        outside.append(route.request.url)
        route.abort()

    page.route(lambda url: not url.startswith(live.url), refuse)
    page.goto(live.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("ConvLens")
    op = page.locator("#operations-predict-predict_predict_post")
    op.locator(".opblock-summary").click()
    op.get_by_role("button", name="Try it out").click()
    op.locator("input[type=file]").first.set_input_files(
        files=[{"name": "three.png", "mimeType": "image/png", "buffer": sample_png(synthetic_data, 3)}]
    )
    op.get_by_role("button", name="Execute").click()
    live_table = op.locator(".live-responses-table")
    expect(live_table.locator("tr.response td.response-col_status").first).to_have_text("200")
    expect(live_table).to_contain_text('"predictions"')
    expect(live_table).to_contain_text('"filename": "three.png"')
    page.screenshot(path=str(artifacts / "docs-try-it-out.png"), full_page=False)
    assert outside == [], f"/docs asked for outside resources: {outside}"


def test_training_live_curves_reload_cancel_and_default(page: Page, live: Live, artifacts: Path) -> None:
    page.goto(live.url + "/")
    form = page.locator("#train-form")
    # The form starts at the seed's recipe.
    expect(form.locator("[name=epochs]")).to_have_value("20")
    expect(form.locator("[name=lr]")).to_have_value("0.001")
    expect(form.locator("[name=milestones]")).to_have_value("10,15,18")
    fill_job(page, "browser-job", epochs=2)

    # No key: the API's 401 detail shows; with the key field filled the job is queued.
    page.click("#train-submit")
    expect(page.locator("#train-err")).to_contain_text("authentication required")
    page.fill("#api-key", API_KEY)
    page.click("#train-submit")
    expect(page.locator("#train-msg")).to_have_text("Job browser-job is queued.")
    expect(page.locator("#watch")).to_have_attribute("data-job", "browser-job")

    # Points arrive over SSE; a reload mid-run backfills from /metrics and goes on streaming.
    page.wait_for_function("document.querySelector('#loss-chart').dataset.points > 0", timeout=90_000)
    seen = [points(page, "#loss-chart")]
    page.reload()
    expect(page.locator("#watch")).to_have_attribute("data-job", "browser-job")
    row = page.locator("#jobs tr[data-job='browser-job']")
    deadline = time.monotonic() + 120
    while (status := row.get_attribute("data-status") if row.count() else None) != "succeeded":
        assert status not in ("failed", "cancelled"), f"the job {status}: {live.stack.workers[0].log()[-3000:]}"
        assert time.monotonic() < deadline, "the job did not reach succeeded"
        seen.append(points(page, "#loss-chart"))
        page.wait_for_timeout(200)
    expect(page.locator("#watch-status")).to_contain_text("browser-job succeeded")
    steps = httpx.get(live.url + "/jobs/browser-job/metrics", params={"kind": "step"}).json()["records"]
    epochs = httpx.get(live.url + "/jobs/browser-job/metrics", params={"kind": "epoch"}).json()["records"]
    assert len(steps) == 8 and len(epochs) == 2
    # Every step once (no gap, no duplicate across backfill and stream), train and eval accuracy per epoch.
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", str(len(steps)))
    expect(page.locator("#acc-chart")).to_have_attribute("data-points", str(2 * len(epochs)))
    seen.append(points(page, "#loss-chart"))
    assert max(seen) > min(seen), f"the curve never gained points: {seen}"
    expect(row.locator("td.status")).to_have_text("succeeded")

    # Across training time: conv1 at every epoch under a slider with a play button, layer statistics beside.
    expect(page.locator("#lapse-label")).to_have_text("epoch 2")  # the newest snapshot
    wait_loaded(page, "#lapse-img")
    assert page.eval_on_selector("#lapse-epoch", "s => [s.min, s.max, s.disabled]") == ["0", "2", False]
    expect(page.locator("#layer-stats tbody tr")).to_have_count(6)
    page.fill("#lapse-epoch", "0")
    expect(page.locator("#lapse-label")).to_have_text("epoch 0")
    expect(page.locator("#layer-stats-epoch")).to_have_text("0 (initialisation)")
    page.click("#lapse-play")
    expect(page.locator("#lapse-label")).to_have_text("epoch 2")  # played through to the end ...
    expect(page.locator("#lapse-play")).to_have_attribute("aria-pressed", "false")  # ... and stopped there
    expect(page.locator("#layer-stats-epoch")).to_have_text("2")
    page.screenshot(path=str(artifacts / "training.png"), full_page=True)

    # The finished run is a model, now the newest and so the default; make the other one the default (the key
    # is still in the tab after the reload).
    expect(page.locator("#models-table tr[data-model='browser-job'] td").last).to_have_text("default")
    model_row = page.locator("#models-table tr[data-model='tiny']")
    model_row.get_by_role("button", name="Make default").click()
    expect(model_row.locator("td").last).to_have_text("default")
    expect(page.locator("#model-select option").first).to_contain_text("(tiny)")
    assert httpx.get(live.url + "/models").json()["default"] == "tiny"

    # A long job, cancelled from the table.
    fill_job(page, "browser-cancel", epochs=50)
    page.click("#train-submit")
    expect(page.locator("#train-msg")).to_have_text("Job browser-cancel is queued.")
    cancel_row = page.locator("#jobs tr[data-job='browser-cancel']")
    cancel_row.get_by_role("button", name="Cancel").click()
    expect(cancel_row).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(page.locator("#watch-status")).to_contain_text("browser-cancel cancelled")
    page.screenshot(path=str(artifacts / "training-cancelled.png"), full_page=False)
