"""The Microscope in a real browser (Debian's Chromium) against a live server and worker: a few channels from
/visualize as a keyboard-usable grid, one channel's four variants beside its top-9 dataset examples and their
projections (/topk), its image through /predict, then a whole layer as an atlas job on the worker, its contact
sheet, and a channel opened from the sheet (its examples follow it)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import API_KEY, Live, browser_missing, wait_loaded

if (why := browser_missing()) is not None:
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Page, ViewportSize, expect  # noqa: E402

expect.set_options(timeout=60_000)
pytestmark = pytest.mark.slow  # a real browser against a real server and worker
PHONE: ViewportSize = {"width": 390, "height": 844}


LONG = 120_000  # ms: an atlas chunk or a top-k index may be computing on shared cores


def canvas_spread(page: Page, selector: str) -> float:
    """The standard deviation of a canvas's pixel values: a rendered image is not one flat grey."""
    return float(
        page.eval_on_selector(
            selector,
            """c => {
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let s = 0, s2 = 0, n = 0;
                for (let i = 0; i < d.length; i += 4) {
                    for (let k = 0; k < 3; k++) { s += d[i + k]; s2 += d[i + k] ** 2; n++; }
                }
                return Math.sqrt(s2 / n - (s / n) ** 2);
            }""",
        )
    )


def expect_top9(page: Page, live: Live, layer: str, channel: int) -> None:
    """The detail's top-9 examples: nine loaded patches and projections, named for the channel, the same images
    GET /topk gives for the page's model."""
    hits = page.locator("#ms-topk .hit")
    expect(hits).to_have_count(9, timeout=240_000)  # the first /topk builds the model's index (202 until then)
    wait_loaded(page, "#ms-topk .hit img", LONG)
    alts = page.eval_on_selector_all("#ms-topk .hit img", "imgs => imgs.map(i => i.alt)")
    assert len(alts) == 18 and all(a.startswith(f"channel {channel} of {layer}, example ") for a in alts), alts
    assert sum(a.endswith("its deconvnet projection") for a in alts) == 9, alts
    shown = [int(x) for x in hits.evaluate_all("lis => lis.map(l => l.dataset.image)")]
    want = httpx.get(f"{live.url}/topk", params={"model": "tiny", "layer": layer, "channel": channel, "k": 9}).json()
    assert shown == [h["image"] for h in want["hits"]], (shown, want)


def test_channels_variants_predict_and_an_atlas(page: Page, live: Live, artifacts: Path) -> None:
    page.goto(live.url + "/")
    page.fill("#api-key", API_KEY)  # POST /atlas queues work: it needs the key here
    expect(page.locator("#model-select option")).not_to_have_count(0)
    form = page.locator("#ms-form")
    expect(form.get_by_label("Layer")).to_have_value("layer3")

    # A few channels: a grid of rendered images, each a button named by its channel.
    form.get_by_label("Layer").select_option("layer2")
    form.get_by_label("Channels").fill("0,1,2,3")
    form.get_by_label("Steps").fill("8")
    form.get_by_role("button", name="Visualize").click()
    tiles = page.locator("#ms-grid .ms-tile")
    expect(tiles).to_have_count(4)
    expect(tiles.nth(2)).to_have_attribute(
        "aria-label", re.compile(r"^Channel 2 \(activation [0-9.]+\): open its variants$")
    )
    assert canvas_spread(page, "#ms-grid .ms-tile canvas") > 1.0

    # By keyboard: the channel opens with its four variants, each a loaded picture with a text alternative.
    tiles.nth(2).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#ms-detail-h")).to_have_text("Channel 2 of layer2")
    expect(page.locator("#ms-detail-h")).to_be_focused()
    expect(tiles.nth(2)).to_have_attribute("aria-pressed", "true")
    wait_loaded(page, "#ms-detail figure img", LONG)
    alts = page.eval_on_selector_all("#ms-detail figure img", "imgs => imgs.map(i => i.alt)")
    assert len(alts) == 4 and all(a.startswith("channel 2 of layer2") for a in alts), alts
    w, h = page.eval_on_selector(
        '#ms-detail figure[data-variant="diversity"] img', "i => [i.naturalWidth, i.naturalHeight]"
    )
    assert w > 1.5 * h, "four diverse images side by side"
    expect_top9(page, live, "layer2", 2)  # beside the variants: the dataset images that drive it hardest

    # The rendered image through /predict: the model's three best guesses.
    classes = httpx.get(f"{live.url}/models/tiny").json().get("classes") or []
    page.get_by_role("button", name="Classify this image (/predict)").click()
    answers = page.locator("#ms-predict li")
    expect(answers).to_have_count(3)
    assert all(c in classes for c in answers.evaluate_all("lis => lis.map(l => l.dataset.class)")), classes

    # A whole layer as an atlas job on the worker: progress, then the labelled contact sheet.
    form.get_by_label("Layer").select_option("conv1")
    expect(page.locator("#ms-detail")).to_be_hidden()
    form.get_by_label("Steps").fill("4")
    page.get_by_role("button", name="Whole layer (atlas job)").click()
    expect(page.locator("#ms-msg")).to_contain_text("Atlas of conv1 (64 channels, 4 steps)")
    expect(page.locator("#ms-msg")).to_contain_text("done", timeout=240_000)
    wait_loaded(page, "#ms-sheet", LONG)
    size = page.eval_on_selector("#ms-sheet", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [8 * 128 + 9 * 2] * 2, size  # 64 tiles of 128 px, 8 x 8 with 2 px padding
    expect(page.locator("#ms-sheet")).to_have_attribute(
        "alt", "Contact sheet: feature visualizations of 64 of 64 channels of conv1"
    )
    atlases = httpx.get(f"{live.url}/atlas").json()["atlases"]
    assert [(a["layers"], a["status"], a["steps"]) for a in atlases] == [(["conv1"], "succeeded", 4)]

    # A click on the sheet's tile at row 1, column 1 opens channel 9; the number field opens any channel.
    box = page.locator("#ms-sheet").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] * 1.5 / 8, box["y"] + box["height"] * 1.5 / 8)
    expect(page.locator("#ms-detail-h")).to_have_text("Channel 9 of conv1")
    page.locator("#ms-open").get_by_label("Open channel").fill("63")
    page.locator("#ms-open").get_by_role("button", name="Open").click()
    expect(page.locator("#ms-detail-h")).to_have_text("Channel 63 of conv1")
    wait_loaded(page, "#ms-detail figure img", LONG)
    expect_top9(page, live, "conv1", 63)
    page.locator("#microscope").screenshot(path=str(artifacts / "microscope.png"))

    # A phone's width: nothing wider than the screen.
    page.set_viewport_size(PHONE)
    page.wait_for_timeout(300)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page is {width}px wide at phone width"
