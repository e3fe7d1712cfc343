"""POST /atlas and its reads, in-process over a private run store: validation (422 naming the field, 404 for an
unknown model), one atlas per weights + parameters, the message on the embedded queue, cancel and re-queue, the
partial contact sheet after a chunk rendered by the real renderer, the active bound, and id abuse in every
position. The worker side (a real worker process, kill and resume) is tests/worker/test_atlas_worker.py."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from jobqueue.contract import ATLAS_TASK
from models.checkpoints import load_checkpoint
from models.featurevis.atlas import AtlasSpec, AtlasStore, Stopped, dataset_color_cov, render_atlas
from models.reverse import select_channels
from service.errors import status_for
from service.routes import atlas as atlas_route
from tests.helpers import link_copy
from tests.service.conftest import make_client
from tests.service.test_id_abuse import BAD_IDS, REFUSED, forms, snapshot

SMALL = {"model": "tiny", "layer": "layer2", "channels": "0,1,2,3,4", "steps": 2, "chunk": 2}


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


def test_sheet_is_409_until_a_chunk_is_done_then_partial(aclient: TestClient, ahome: Path) -> None:
    aid = aclient.post("/atlas", json=SMALL).json()["id"]
    r = aclient.get(f"/atlas/{aid}/sheet.png")
    assert r.status_code == 409 and "no channel of layer2 is finished" in r.json()["detail"]
    assert aclient.get(f"/atlas/{aid}/sheet.png", params={"layer": "layer3"}).status_code == 422

    # The first chunk, rendered by the real renderer as a worker would, then stopped (a cancel, a kill).
    store = AtlasStore(ahome)
    spec = AtlasSpec.from_json(store.read(aid)["spec"])
    model, meta = load_checkpoint(ahome / "runs" / "tiny" / "checkpoints" / "best")
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
            for method, path in (("GET", "/atlas/{}"), ("GET", "/atlas/{}/sheet.png"), ("DELETE", "/atlas/{}")):
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
