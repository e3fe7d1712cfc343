"""POST /atlas and its reads, in-process over a private run store: validation (422 naming the field, 404 for an
unknown model), one atlas per weights + parameters, the message on the embedded queue, cancel and re-queue, the
partial contact sheet after a chunk rendered by the real renderer, the active bound, id abuse in every
position, and the per-channel view (each channel's image, top-9 examples and top projection as links that answer
through the same app; every bad layer, channel and scale a 4xx naming it; the grammars in the schema). The
worker side (a real worker process, kill and resume) is tests/worker/test_atlas_worker.py."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from jobqueue.contract import ATLAS_TASK
from models.checkpoints import load_checkpoint
from models.featurevis.atlas import AtlasSpec, AtlasStore, Stopped, dataset_color_cov, render_atlas
from models.resnet import LAYER_CHOICES
from models.reverse import select_channels
from models.runs import RUN_ID_RE
from service.errors import status_for
from service.grammar import CHANNEL_LIST_PATTERN
from service.routes import atlas as atlas_route
from tests.helpers import link_copy
from tests.service.conftest import make_client
from tests.service.test_id_abuse import BAD_IDS, REFUSED, forms, snapshot

SMALL = {"model": "tiny", "layer": "layer2", "channels": "0,1,2,3,4", "steps": 2, "chunk": 2}
ID_POSITIONS = (
    ("GET", "/atlas/{}"),
    ("GET", "/atlas/{}/sheet.png"),
    ("GET", "/atlas/{}/channels"),
    ("GET", "/atlas/{}/channel/layer2/0.png"),
    ("DELETE", "/atlas/{}"),
)


@pytest.fixture
def ahome(trained_home: Path, tmp_path: Path) -> Path:
    return link_copy(trained_home, tmp_path / "home")


@pytest.fixture
def aclient(ahome: Path, synthetic_data: Path) -> Iterator[TestClient]:
    with make_client(ahome, synthetic_data) as c:
        yield c


def messages(home: Path) -> list[dict[str, Any]]:
    """The task messages waiting in the embedded file queue."""
    return [json.loads(p.read_bytes()) for p in sorted((home / "queue" / "messages").glob("*.msg"))]


def test_post_queues_one_atlas_per_weights_and_parameters(aclient: TestClient, ahome: Path) -> None:
    r = aclient.post("/atlas", json=SMALL)
    assert r.status_code == 202, r.text
    body = r.json()
    aid = body["id"]
    assert aid.startswith("atlas-layer2-") and body["status"] == "queued" and body["dispatched"] is True
    assert body["existing"] is False and body["chunks_total"] == 3 and body["chunks_done"] == 0
    assert body["layers"] == [
        {
            "layer": "layer2",
            "channels": [0, 1, 2, 3, 4],
            "done": [],
            "grid": [0, 0],
            "sheet_url": body["layers"][0]["sheet_url"],
        }
    ]
    sent = [m["headers"] for m in messages(ahome)]
    assert [(h["task"], h["id"]) for h in sent] == [(ATLAS_TASK, aid)]
    rec = json.loads((ahome / "atlas" / aid / "atlas.json").read_text())
    assert rec["model"] == "tiny" and rec["stem"] == "runs/tiny/checkpoints/best" and rec["queue"] == "train"

    # The same request (an alias of the layer, a duplicate channel) is the same atlas: answered, not queued again.
    again = aclient.post("/atlas", json={**SMALL, "layer": "conv3_x", "channels": "0,1,2,2,3,4"})
    assert again.status_code == 200 and again.json()["id"] == aid and again.json()["existing"] is True
    assert len(messages(ahome)) == 1
    # Another seed is another atlas; the model may come in the query as on every model-backed route.
    other = aclient.post("/atlas", json={**SMALL, "seed": 1})
    assert other.status_code == 202 and other.json()["id"] != aid

    listed = aclient.get("/atlas", params={"model": "tiny"}).json()
    assert listed["total"] == 2 and {a["id"] for a in listed["atlases"]} == {aid, other.json()["id"]}
    assert aclient.get("/atlas", params={"status": "succeeded"}).json() == {"total": 0, "atlases": []}
    got = aclient.get(f"/atlas/{aid}").json()
    assert got["status"] == "queued" and got["eta_s"] is None and got["steps"] == 2 and "stem" not in got


def out_of_range_status() -> int:
    """What every look-inside endpoint answers for a well-formed channel past the layer (the house's one rule)."""
    try:
        select_channels([999], torch.zeros(128))
    except Exception as e:  # the status the service maps that exception to
        return status_for(e)  # type: ignore[arg-type]
    raise AssertionError("select_channels accepted channel 999 of 128")


@pytest.mark.parametrize(
    ("change", "status", "word"),
    [
        ({"steps": 0}, 422, "steps"),
        ({"steps": 2049}, 422, "steps"),
        ({"seed": -1}, 422, "seed"),
        ({"seed": 2**31}, 422, "seed"),
        ({"chunk": 0}, 422, "chunk"),
        ({"chunk": 257}, 422, "chunk"),
        ({"objective": "diversity"}, 422, "objective"),
        ({"layer": "layer9"}, 422, "layer"),
        ({"layer": "fc"}, 422, "layer"),
        ({"channels": "top:4"}, 422, "channels"),
        ({"channels": "0,,1"}, 422, "channels"),
        ({"channels": "-1"}, 422, "channels"),
        ({"channels": "x" * 5000}, 422, "channels"),
        ({"channels": "200"}, None, "out of range"),
        ({"layer": "all", "channels": "0,1"}, 422, "channels"),
        ({"layer": "all", "steps": 2048, "channels": "all"}, 422, "steps"),
        ({"surprise": 1}, 422, "surprise"),
        ({"model": "../tiny"}, 422, "model"),
        ({"model": "nope"}, 404, "nope"),
    ],
)
def test_every_bad_field_is_refused_naming_it(
    aclient: TestClient, ahome: Path, change: dict, status: int | None, word: str
) -> None:
    r = aclient.post("/atlas", json={**SMALL, **change})
    assert r.status_code == (status or out_of_range_status()), r.text
    assert word in json.dumps(r.json()["detail"]), r.text
    assert not (ahome / "atlas").exists() or not any((ahome / "atlas").glob("atlas-*")), "nothing created"
    assert messages(ahome) == []


def render_first_chunk(home: Path, aid: str) -> None:
    """The first chunk, rendered by the real renderer as a worker would, then stopped (a cancel, a kill)."""
    store = AtlasStore(home)
    spec = AtlasSpec.from_json(store.read(aid)["spec"])
    model, meta = load_checkpoint(home / "runs" / "tiny" / "checkpoints" / "best")
    chunks = len(store.finished(aid, spec))
    with pytest.raises(Stopped):
        render_atlas(
            store,
            aid,
            spec,
            model,
            meta,
            dataset_color_cov(meta, Path()),
            1,
            should_stop=lambda: len(store.finished(aid, spec)) > chunks,
        )
    assert store.finished(aid, spec) == [0]


def test_sheet_is_409_until_a_chunk_is_done_then_partial(aclient: TestClient, ahome: Path) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    r = aclient.get(f"/atlas/{aid}/sheet.png")
    assert r.status_code == 409 and "no channel of layer2 is finished" in r.json()["detail"]
    assert aclient.get(f"/atlas/{aid}/sheet.png", params={"layer": "layer3"}).status_code == 422

    render_first_chunk(ahome, aid)

    got = aclient.get(f"/atlas/{aid}").json()
    assert got["chunks_done"] == 1 and got["layers"][0]["done"] == [0, 1] and got["layers"][0]["grid"] == [1, 2]
    r = aclient.get(f"/atlas/{aid}/sheet.png", params={"scale": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-convlens-channels"] == "0,1" and r.headers["x-convlens-complete"] == "false"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # two 64-pixel tiles with the grid's padding
    alias = aclient.get(f"/atlas/{aid}/sheet.png", params={"layer": "conv3_x"})  # the seed's name; default scale
    assert alias.status_code == 200 and Image.open(io.BytesIO(alias.content)).size == (2 * 128 + 3 * 2, 128 + 2 * 2)
    assert aclient.get(f"/atlas/{aid}/sheet.png", params={"scale": 9}).status_code == 422


def test_cancel_then_ask_again_requeues_it(aclient: TestClient, ahome: Path) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    r = aclient.delete(f"/atlas/{aid}")
    assert r.status_code == 200 and r.json() == {"id": aid, "status": "cancelled", "cancel_requested": True}
    assert aclient.delete(f"/atlas/{aid}").status_code == 200  # again: a no-op
    again = aclient.post("/atlas", json=SMALL)
    assert again.status_code == 202 and again.json()["id"] == aid and again.json()["status"] == "queued"
    assert again.json()["cancel_requested"] is False and len(messages(ahome)) == 2
    AtlasStore(ahome).update(aid, status="succeeded")
    assert aclient.delete(f"/atlas/{aid}").status_code == 409
    assert aclient.post("/atlas", json=SMALL).status_code == 200  # finished: answered, never computed again


def test_too_many_active_atlases_is_a_429(aclient: TestClient) -> None:
    for seed in range(atlas_route.MAX_ACTIVE):
        assert aclient.post("/atlas", json={**SMALL, "seed": seed}).status_code == 202
    r = aclient.post("/atlas", json={**SMALL, "seed": 99})
    assert r.status_code == 429 and r.headers["retry-after"] and "atlases" in r.json()["detail"]
    assert aclient.post("/atlas", json={**SMALL, "seed": 0}).status_code == 200  # an existing one still answers


def test_writes_need_the_key_when_one_is_set(ahome: Path, synthetic_data: Path) -> None:
    with make_client(ahome, synthetic_data, api_key=["k"]) as c:
        assert c.post("/atlas", json=SMALL).status_code == 401
        r = c.post("/atlas", json=SMALL, headers={"Authorization": "Bearer k"})
        assert r.status_code == 202
        assert c.delete(f"/atlas/{r.json()['id']}").status_code == 401
        assert c.get(f"/atlas/{r.json()['id']}").status_code == 200  # reads stay open unless CONVLENS_AUTH=all


def test_every_atlas_id_position_refuses_abuse(aclient: TestClient, ahome: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "atlas" / "victim").mkdir(parents=True)
    (outside / "atlas" / "victim" / "atlas.json").write_text('{"id": "victim"}')
    before_out, before_home = snapshot(outside), snapshot(ahome)
    wrong = []
    for bad in [*BAD_IDS, "../outside/atlas/victim", str(outside / "atlas" / "victim")]:
        for s in forms(bad):
            for method, path in ID_POSITIONS:
                try:
                    r = aclient.request(method, path.format(s))
                except Exception as e:  # the client itself refusing a URL is not the server's doing
                    if "Invalid" in type(e).__name__ or "URL" in str(e):
                        continue
                    raise
                if r.status_code not in REFUSED or "victim" in r.text.replace(s, "").replace(bad, ""):
                    wrong.append(f"{method} {path.format(s)[:80]!r}: {r.status_code} {r.text[:80]!r}")
        r = aclient.get("/atlas", params={"model": bad})
        if r.status_code not in REFUSED and bad != "tiny":
            wrong.append(f"GET /atlas?model={bad[:40]!r}: {r.status_code}")
    assert not wrong, "\n".join(wrong)
    assert snapshot(outside) == before_out and snapshot(ahome) == before_home
    assert aclient.get("/atlas/" + quote("atlas-x", safe="")).status_code == 404  # a well-formed id that is absent
    assert not os.path.exists(ahome / "atlas" / "victim")


# ---- per channel: GET /atlas/{id}/channels and /atlas/{id}/channel/{layer}/{c}.png ------------------------------


def get_ready(client: TestClient, url: str, timeout: float = 300) -> Any:
    """GET a link until it stops answering 202 (a /topk link while the model's top-k index builds)."""
    deadline = time.monotonic() + timeout
    while (r := client.get(url)).status_code == 202:
        assert time.monotonic() < deadline, f"{url} still 202 after {timeout} s"
        time.sleep(0.2)
    return r


def test_channels_view_gives_each_channel_with_links_that_resolve(aclient: TestClient, ahome: Path) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    before = aclient.get(f"/atlas/{aid}/channels").json()
    assert before["channels_done"] == 0 and before["links"]["sheet_url"] is None and before["grid"] == [0, 0]
    assert [c["visualization_url"] for c in before["channels"]] == [None] * 5
    assert aclient.get(f"/atlas/{aid}/channel/layer2/0.png").status_code == 409  # queued: nothing finished
    render_first_chunk(ahome, aid)

    r = aclient.get(f"/atlas/{aid}/channels", params={"layer": "conv3_x"})  # the seed's alias of layer2
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["model"], body["layer"], body["status"]) == (aid, "tiny", "layer2", "queued")
    assert (body["channels_total"], body["channels_done"], body["complete"], body["grid"]) == (5, 2, False, [1, 2])
    assert body["steps"] == 2 and body["sha256"] and body["objective"] == "channel"
    rows = body["channels"]
    assert [(c["channel"], c["done"], c["tile"]) for c in rows] == [
        (0, True, 0), (1, True, 1), (2, False, None), (3, False, None), (4, False, None)
    ]  # fmt: skip
    assert all(isinstance(c["activation"], float) and isinstance(c["objective_value"], float) for c in rows[:2])
    assert rows[2]["visualization_url"] is None and rows[2]["activation"] is None

    # Each link answers through the same app: the channel's own image (scale 1: the 32x32 it optimized) ...
    store = AtlasStore(ahome)
    spec = AtlasSpec.from_json(store.read(aid)["spec"])
    chunk = store.read_chunk(aid, 0, "layer2", (0, 1))
    assert chunk is not None
    for row, image in zip(rows[:2], chunk["images"], strict=True):
        got = aclient.get(row["visualization_url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        pixels = torch.tensor(np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))).permute(2, 0, 1)
        assert (pixels.float() - image * 255).abs().max() <= 0.5 + 1e-3  # exactly, up to 8-bit rounding
    big = aclient.get(rows[1]["visualization_url"], params={"scale": 4})
    assert Image.open(io.BytesIO(big.content)).size == (128, 128)
    sheet = aclient.get(body["links"]["sheet_url"])
    assert sheet.status_code == 200 and sheet.headers["x-convlens-channels"] == "0,1"
    assert aclient.get(body["links"]["status_url"]).json()["id"] == aid

    # ... and /topk's top-9 examples and the top one's deconvnet projection, for the atlas's model and layer.
    topk = get_ready(aclient, rows[0]["topk_url"])
    assert topk.status_code == 200, topk.text
    t = topk.json()
    assert (t["model"], t["layer"], t["channel"], t["k"], t["rule"]) == ("tiny", "layer2", 0, 9, "deconvnet")
    for key in ("topk_png_url", "projection_url"):
        png = get_ready(aclient, rows[4][key])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png", key
    hit0 = get_ready(aclient, rows[0]["projection_json_url"]).json()["hits"]
    assert len(hit0) == 1 and hit0[0]["image"] == t["hits"][0]["image"]
    assert hit0[0]["projection_png"].startswith("data:image/png;base64,")

    # The channels asked, in the order asked (duplicates once); the same layer's sheet tiles.
    some = aclient.get(f"/atlas/{aid}/channels", params={"channels": "1,0,1"}).json()["channels"]
    assert [(c["channel"], c["tile"]) for c in some] == [(1, 1), (0, 0)]
    assert spec.layers == (("layer2", (0, 1, 2, 3, 4)),)


def test_the_list_filters_by_layer_and_links_each_atlas_per_channel(aclient: TestClient) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    other = aclient.post("/atlas", json={**SMALL, "layer": "conv1"}).json()["id"]
    listed = aclient.get("/atlas", params={"model": "tiny", "layer": "conv3_x"}).json()
    assert listed["total"] == 1 and [a["id"] for a in listed["atlases"]] == [aid]
    link = listed["atlases"][0]["links"]["channels_url"]
    got = aclient.get(link)
    assert got.status_code == 200 and got.json()["layer"] == "layer2" and len(got.json()["channels"]) == 5
    assert aclient.get("/atlas", params={"layer": "layer4"}).json()["total"] == 0
    r = aclient.get("/atlas", params={"layer": "layer9"})
    assert r.status_code == 422 and "layer9" in json.dumps(r.json()["detail"])
    everyone = {a["id"]: a["links"] for a in aclient.get("/atlas").json()["atlases"]}
    assert set(everyone) == {aid, other} and "layer=conv1" in everyone[other]["channels_url"]


@pytest.mark.parametrize(
    ("path", "params", "status", "word"),
    [
        ("/atlas/{}/channels", {"layer": "layer3"}, 422, "holds layer2"),  # a layer the atlas lacks
        ("/atlas/{}/channels", {"layer": "fc"}, 422, "layer"),
        ("/atlas/{}/channels", {"channels": "7"}, 404, "0..4"),  # well formed, not in this atlas
        ("/atlas/{}/channels", {"channels": "0,600"}, 422, "channels"),
        ("/atlas/{}/channels", {"channels": "top:3"}, 422, "top:N"),
        ("/atlas/{}/channels", {"channels": "0,,1"}, 422, "channels"),
        ("/atlas/{}/channels", {"channels": "x" * 3000}, 422, "channels"),
        ("/atlas/{}/channel/layer2/7.png", {}, 404, "0..4"),
        ("/atlas/{}/channel/layer2/512.png", {}, 422, "channel"),
        ("/atlas/{}/channel/layer2/-1.png", {}, 422, "channel"),
        ("/atlas/{}/channel/layer2/x.png", {}, 422, "channel"),
        ("/atlas/{}/channel/layer3/0.png", {}, 422, "holds layer2"),
        ("/atlas/{}/channel/nope/0.png", {}, 422, "layer"),
        ("/atlas/{}/channel/layer2/0.png", {"scale": 0}, 422, "scale"),
        ("/atlas/{}/channel/layer2/0.png", {"scale": 17}, 422, "scale"),
        ("/atlas/{}/channel/layer2/2.png", {}, 409, "not finished"),
        ("/atlas/atlas-absent/channels", {}, 404, "atlas-absent"),
        ("/atlas/atlas-absent/channel/layer2/0.png", {}, 404, "atlas-absent"),
    ],
)
def test_every_bad_channel_request_is_a_4xx_naming_it(
    aclient: TestClient, ahome: Path, path: str, params: dict, status: int, word: str
) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    if status == 409:
        render_first_chunk(ahome, aid)
    r = aclient.get(path.format(aid), params=params)
    assert r.status_code == status, r.text
    assert word in json.dumps(r.json()["detail"]), r.text


def test_the_schema_states_each_per_channel_grammar(aclient: TestClient) -> None:
    paths = aclient.get("/openapi.json").json()["paths"]
    view = {p["name"]: p["schema"] for p in paths["/atlas/{atlas_id}/channels"]["get"]["parameters"]}
    assert view["channels"]["pattern"] == CHANNEL_LIST_PATTERN and view["atlas_id"]["pattern"] == RUN_ID_RE.pattern
    assert set(view["layer"]["enum"]) == set(LAYER_CHOICES)
    png = {
        p["name"]: p["schema"] for p in paths["/atlas/{atlas_id}/channel/{layer}/{channel}.png"]["get"]["parameters"]
    }
    assert set(png["layer"]["enum"]) == set(LAYER_CHOICES) and (
        png["channel"]["minimum"],
        png["channel"]["maximum"],
    ) == (0, 511)
    listed = {p["name"]: p["schema"] for p in paths["/atlas"]["get"]["parameters"]}
    assert set(listed["layer"]["enum"]) == set(LAYER_CHOICES)
    sheet = {p["name"]: p["schema"] for p in paths["/atlas/{atlas_id}/sheet.png"]["get"]["parameters"]}
    assert set(sheet["layer"]["enum"]) == set(LAYER_CHOICES)
