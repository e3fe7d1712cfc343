"""Routes: the atlas, every chosen channel's feature visualization as one queued, resumable job (worker/atlas.py).

POST /atlas validates the request against the model (422 naming the field, 404 for an unknown model), derives the
atlas id from the weights' sha256 and every parameter (models/featurevis/atlas.py) and, unless that atlas exists,
writes its atlas.json and sends it by task name through jobqueue: the API carries no rendering. The same request
again answers the existing atlas (200), so nothing is computed twice; a failed or cancelled one is queued again
and resumes after its finished chunks. Everything else reads the run store: GET /atlas/{id} (status, progress,
chunks, ETA), GET /atlas/{id}/sheet.png (the contact sheet of every channel finished so far: partial while the
job runs, 409 while none is), GET /atlas (the list), DELETE /atlas/{id} (cancel; what is finished stays).

Per channel: GET /atlas/{id}/channels?layer=L (JSON: each channel's state, its tile on the sheet, and links) and
GET /atlas/{id}/channel/{layer}/{c}.png (its image, read from the chunk that holds it). The links to a channel's
top-9 dataset examples and the deconvnet projection of the top one point at GET /topk, which owns that index: this
module only names them, so nothing here computes them twice or differently.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from jobqueue.app import send_atlas
from jobqueue.contract import LEASE_FILE, TERMINAL
from models.errors import InvalidArgument, NoSuchChannel
from models.featurevis import DEFAULT_STEPS
from models.featurevis.atlas import (
    ACTIVE,
    DEFAULT_CHUNK,
    MAX_CHUNK,
    AtlasNotFound,
    AtlasSpec,
    AtlasStore,
    atlas_id,
    channel_image,
    channel_png,
    layer_channels,
    layer_images,
    make_spec,
    new_record,
    sheet_png,
)
from models.loader import stem_in_store
from models.render import grid_shape
from models.resnet import LAYER_ALIASES, LAYER_CHOICES, WIDEST, ResNet18, canonical_layer
from models.runs import RUN_ID_RE
from service.auth import AUTH_401, WriteAccess
from service.deps import RegistryDep, SettingsDep
from service.grammar import CHANNEL_LIST_PATTERN, MAX_CHANNELS_CHARS
from service.registry import LoadedModel
from service.routes.jobs import SenderDep
from service.routes.visualize import MAX_STEPS

log = logging.getLogger("convlens.atlas")
router = APIRouter(tags=["look inside"])

MAX_WORK = 1024 * 512  # channels x steps per atlas: every channel of conv1..layer4 at 512 steps
MAX_ACTIVE = 8  # atlases queued or running at once; more answer 429 (each one holds a worker for minutes)
MAX_SCALE = 8
SHEET_SCALE = 4  # a 32x32 image becomes a 128x128 tile ...
BIG_SHEET = 128  # ... up to this many tiles; above, 64x64 tiles keep a layer4 sheet near 1,500 pixels a side

AtlasId = Annotated[
    str, Path(pattern=RUN_ID_RE.pattern, max_length=64, description="an atlas id (POST /atlas answers it)")
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no atlas with that id"}}
# /visualize's grammar less `top:N` (it ranks channels by an image's activation, and an atlas takes no image).
CHANNELS_PATTERN = CHANNEL_LIST_PATTERN
CHANNELS_HELP = f"`all`, or a comma-separated list of indices (`3,17,42`; 0..{WIDEST - 1}, at most {WIDEST})"
_CHANNELS = re.compile(CHANNELS_PATTERN)
TOPK_K = 9  # the examples a channel's entry links to (Zeiler-Fergus figure 2's nine)
MAX_CHANNEL_SCALE = 16
LAYER_ENUM = {"enum": list(LAYER_CHOICES)}  # the schema states the names; an atlas lacking one answers 422
AtlasLayer = Annotated[
    str | None,
    Query(max_length=64, description="one of the atlas's layers (default: its first)", json_schema_extra=LAYER_ENUM),
]


class AtlasRequest(BaseModel):
    """What to render; every field is bounded, and an error names it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, pattern=RUN_ID_RE.pattern, max_length=64, description="model id (GET /models); default: the default"
    )
    layer: Literal[
        "conv1", "layer1", "layer2", "layer3", "layer4", "conv2_x", "conv3_x", "conv4_x", "conv5_x", "all"
    ] = Field("layer3", description="a named layer (or the seed's alias); `all`: every channel of conv1..layer4")
    # The grammar is stated in the schema and checked by grammar.parse_channels (our message, not pydantic's).
    channels: str = Field(
        "all",
        max_length=MAX_CHANNELS_CHARS,
        description=CHANNELS_HELP,
        json_schema_extra={"pattern": CHANNELS_PATTERN},
    )
    objective: Literal["channel", "neuron", "negative"] = Field("channel", description="as /visualize")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS, description="optimization steps per image")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the same seed gives the same images")
    chunk: int = Field(
        DEFAULT_CHUNK, ge=1, le=MAX_CHUNK, description="channels per chunk: a killed job resumes after its last one"
    )


def atlas_store(settings: Any) -> AtlasStore:
    return AtlasStore(settings.home)


def channel_list(value: str) -> Literal["all"] | list[int]:
    """`all` or `3,17,42` (CHANNELS_PATTERN exactly); 422 naming `channels` for anything else."""
    if value.startswith("top:"):
        raise InvalidArgument(
            "channels: top:N ranks channels by an image's activation, and an atlas takes no image; give 'all' or a list"
        )
    if not _CHANNELS.fullmatch(value):
        raise InvalidArgument(f"channels must be {CHANNELS_HELP}; got {value[:80]!r}")
    return "all" if value == "all" else [int(p) for p in value.split(",")]


def resolve_spec(net: ResNet18, req: AtlasRequest) -> AtlasSpec:
    """The request checked against the model and the bounds (each error names its field)."""
    chosen = channel_list(req.channels)
    spec = make_spec(net, req.layer, chosen, req.objective, req.steps, req.seed, req.chunk)
    if spec.channels * spec.steps > MAX_WORK:
        raise InvalidArgument(
            f"steps: {spec.channels} channels x {spec.steps} steps = {spec.channels * spec.steps:,}; the limit is "
            f"{MAX_WORK:,}: ask for fewer steps or channels"
        )
    return spec


def view(request: Request, store: AtlasStore, rec: dict[str, Any]) -> dict[str, Any]:
    """An atlas as the API shows it: its record, and per layer the channels finished (in sheet order) and links."""
    aid = rec["id"]
    spec = AtlasSpec.from_json(rec["spec"])
    finished = set(store.finished(aid, spec))
    layers = []
    for layer, chans in spec.layers:
        done = [c for i, (name, cs) in enumerate(spec.plan()) if name == layer and i in finished for c in cs]
        layers.append(
            {
                "layer": layer,
                "channels": list(chans),
                "done": done,
                "grid": list(grid_shape(len(done))) if done else [0, 0],
                "sheet_url": str(request.url_for("atlas_sheet", atlas_id=aid).include_query_params(layer=layer)),
            }
        )
    hidden = ("spec", "traceback", "stem")  # the spec is shown flat; paths and tracebacks stay in the store
    return {
        **{k: v for k, v in rec.items() if k not in hidden},
        **{k: v for k, v in rec["spec"].items() if k != "layers"},
        "layers": layers,
        "chunks_done": len(finished),
        "chunks_total": len(spec.plan()),
        "eta_s": (rec.get("progress") or {}).get("eta_s") if rec.get("status") == "running" else None,
        "cancel_requested": store.cancel_requested(aid),
        "links": {"status_url": str(request.url_for("get_atlas", atlas_id=aid)), "sheet_url": layers[0]["sheet_url"]},
    }


def _enqueue(store: AtlasStore, sender: Any, loaded: LoadedModel, spec: AtlasSpec, home: Any) -> tuple[dict, bool]:
    """(the atlas's record, whether it was queued now): a new one is created, a failed or cancelled one queued again
    (it resumes after its finished chunks), anything else answered as it is."""
    aid = atlas_id(spec, loaded.meta)
    queue = sender.conf.task_default_queue
    try:
        rec: dict[str, Any] | None = store.read(aid)
    except AtlasNotFound:
        rec = None
    if rec is not None and rec.get("status") not in ("failed", "cancelled"):
        return rec, False
    if sum(r.get("status") in ACTIVE for r in store.list_atlases()) >= MAX_ACTIVE:
        raise HTTPException(
            429, f"{MAX_ACTIVE} atlases are queued or running, the most one server accepts; retry when one ends",
            headers={"Retry-After": "30"},
        )  # fmt: skip
    if rec is None:
        sha = str(loaded.meta.get("sha256") or "unhashed")
        rec, created = store.create(new_record(aid, loaded.id, sha, stem_in_store(home, loaded.stem), spec, queue))
        if not created:  # an identical request created it a moment ago
            return rec, False
    else:
        store.clear_cancel(aid)
        rec = store.update(aid, status="queued", error=None, lost=0, queue=queue, finished=None)
    try:
        send_atlas(sender, aid)
    except Exception as e:  # the broker is down: saved as queued, and a worker's reconciler sends it
        log.warning("atlas %s saved but not sent (%s); a worker's reconciler will send it", aid, e)
        return {**rec, "dispatched": False}, True
    return {**rec, "dispatched": True}, True


@router.post(
    "/atlas",
    status_code=202,
    summary="Queue an atlas: the feature visualization of every chosen channel, rendered by a worker",
    responses={
        200: {"description": "the same atlas (same weights and parameters) exists: its status"},
        202: {"description": "queued: follow links.status_url"},
        400: {"description": "the body is not JSON text (e.g. not UTF-8)"},
        401: AUTH_401,
        404: {"description": "no model with that id"},
        422: {"description": "a field out of bounds, unknown layer, channel out of range (the detail names it)"},
        429: {"description": "too many atlases queued or running (Retry-After)"},
        503: {"description": "no model yet, or its checkpoint cannot be loaded"},
    },
    dependencies=[WriteAccess],
)
def create_atlas(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    sender: SenderDep,
    body: AtlasRequest | None = None,
) -> JSONResponse:
    """Render a layer's channels (`layer`, `channels`; `layer=all`: every channel of conv1..layer4) as a job on
    the training queue, for the body's `model` (the default model when it names none)."""
    req = body or AtlasRequest()
    loaded = registry.get(req.model)
    spec = resolve_spec(loaded.model, req)  # type: ignore[arg-type]
    store = atlas_store(settings)
    rec, queued = _enqueue(store, sender, loaded, spec, settings.home)
    body_out = {**view(request, store, rec), "existing": not queued}
    if "dispatched" in rec:
        body_out["dispatched"] = rec["dispatched"]
    return JSONResponse(body_out, status_code=202 if queued else 200)


def _layers_of(rec: dict[str, Any]) -> list[str]:
    return [str(e.get("layer")) for e in (rec.get("spec") or {}).get("layers", [])]


@router.get("/atlas", summary="Every atlas, newest first", responses={422: {"description": "an unknown layer"}})
def list_atlases(
    request: Request,
    settings: SettingsDep,
    model: Annotated[str | None, Query(pattern=RUN_ID_RE.pattern, max_length=64, description="only this model")] = None,
    layer: Annotated[
        str | None,
        Query(
            max_length=64,
            description="only atlases holding this layer; each one's `links.channels_url` is then that layer's "
            "per-channel view",
            json_schema_extra=LAYER_ENUM,
        ),
    ] = None,
    status: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query(description="only this status")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, Any]:
    """Each atlas's id, model, layers, parameters, status and progress, with links to its status (GET /atlas/{id})
    and its per-channel view (GET /atlas/{id}/channels: the asked layer, else the atlas's first)."""
    canon = canonical_layer(layer) if layer is not None else None  # UnknownLayer (422) lists the valid names
    rows = [
        r
        for r in atlas_store(settings).list_atlases()
        if (model is None or r.get("model") == model)
        and (status is None or r.get("status") == status)
        and (canon is None or canon in _layers_of(r))
    ]
    keys = ("id", "model", "status", "created", "finished", "progress", "error")
    out = []
    for r in rows[offset : offset + limit]:
        spec = r.get("spec") or {}
        layers = _layers_of(r)
        shown = canon or (layers[0] if layers else None)
        links = {"status_url": str(request.url_for("get_atlas", atlas_id=r["id"]))}
        if shown:
            links["channels_url"] = str(
                request.url_for("atlas_channels", atlas_id=r["id"]).include_query_params(layer=shown)
            )
        out.append(
            {
                **{k: r.get(k) for k in keys},
                "layers": layers,
                **{k: v for k, v in spec.items() if k != "layers"},
                "links": links,
            }
        )
    return {"total": len(rows), "atlases": out}


def _read(store: AtlasStore, aid: str) -> dict[str, Any]:
    try:
        return store.read(aid)
    except AtlasNotFound as e:
        raise HTTPException(404, str(e)) from e


def _atlas_layer(aid: str, spec: AtlasSpec, layer: str | None) -> str:
    """The atlas's layer a request names (the seed's aliases too; default: its first), 422 listing them if absent
    (as a layer the model lacks is: the name is the client's, not a missing resource)."""
    names = [name for name, _ in spec.layers]
    chosen = LAYER_ALIASES.get(layer, layer) if layer else names[0]
    if chosen not in names:
        raise InvalidArgument(f"layer: atlas {aid} holds {', '.join(names)}; got {chosen[:64]!r}")
    return chosen


def _check_held(aid: str, layer: str, planned: tuple[int, ...], asked: list[int]) -> None:
    """Every asked channel is one the atlas planned; else NoSuchChannel (404) saying which it holds. Not "the
    layer's range": an atlas of channels 0..4 says nothing of the layer's width, and knowing it means loading the
    model."""
    held = set(planned)
    missing = next((c for c in asked if c not in held), None)
    if missing is None:
        return
    if planned == tuple(range(len(planned))):
        shown = f"0..{len(planned) - 1}"
    else:
        shown = ",".join(map(str, planned[:32])) + (",..." if len(planned) > 32 else "")
    raise NoSuchChannel(f"channel {missing} is not in atlas {aid}: it holds channels {shown} of {layer}")


@router.get("/atlas/{atlas_id}", name="get_atlas", responses=NOT_FOUND)
def get_atlas(atlas_id: AtlasId, request: Request, settings: SettingsDep) -> dict[str, Any]:
    """Status, progress (`chunks_done` of `chunks_total`, `eta_s` while running), attempts, and per layer the
    channels finished so far (in the sheet's order, with the sheet's grid) and the sheet's URL."""
    store = atlas_store(settings)
    return view(request, store, _read(store, atlas_id))


@router.get(
    "/atlas/{atlas_id}/sheet.png",
    name="atlas_sheet",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **NOT_FOUND,
        409: {"description": "no channel of that layer is finished yet (the detail gives the progress)"},
        422: {"description": "a layer the atlas does not hold (the detail lists its layers)"},
    },
)
def atlas_sheet(
    atlas_id: AtlasId,
    settings: SettingsDep,
    layer: AtlasLayer = None,
    scale: Annotated[
        int | None,
        Query(ge=1, le=MAX_SCALE, description=f"upscale per tile (default {SHEET_SCALE}; 2 above {BIG_SHEET} tiles)"),
    ] = None,
) -> Response:
    """The contact sheet of every finished channel of a layer, each tile labelled with its channel. While the job
    runs it holds the channels finished so far (`X-ConvLens-Complete: false`); `X-ConvLens-Channels` lists them
    in tile order and `X-ConvLens-Grid` gives rows,cols."""
    store = atlas_store(settings)
    rec = _read(store, atlas_id)
    spec = AtlasSpec.from_json(rec["spec"])
    chosen = _atlas_layer(atlas_id, spec, layer)
    channels, images = layer_images(store, atlas_id, spec, chosen)
    if not channels:
        done = (rec.get("progress") or {}).get("fraction", 0.0)
        raise HTTPException(
            409, f"no channel of {chosen} is finished yet (atlas {rec.get('status')}, {done:.0%} done); retry later"
        )
    total = len(dict(spec.layers)[chosen])
    headers = {
        "X-ConvLens-Channels": ",".join(map(str, channels)),
        "X-ConvLens-Complete": str(len(channels) == total).lower(),
        "X-ConvLens-Grid": ",".join(map(str, grid_shape(len(channels)))),
        "Cache-Control": "no-store" if len(channels) < total else "max-age=3600",
    }
    scale = scale or (SHEET_SCALE if len(channels) <= BIG_SHEET else 2)
    return Response(sheet_png(channels, images, scale), media_type="image/png", headers=headers)


CHANNEL_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no atlas with that id, or a channel it does not hold (the detail gives what it holds)"},
    422: {"description": "a malformed channel, or a layer the atlas does not hold (the detail lists its layers)"},
}


def _channel_links(request: Request, aid: str, model: str, layer: str, row: dict[str, Any]) -> dict[str, Any]:
    """A channel's links: its image here (once finished: a link answers 200, not 409), and its top-9 dataset
    examples and the deconvnet projection of the top one at /topk, for the atlas's model (202 while that index
    builds, as /topk always answers)."""
    c = row["channel"]
    topk = request.url_for("get_topk").include_query_params(model=model, layer=layer, channel=c)
    image = request.url_for("atlas_channel_png", atlas_id=aid, layer=layer, channel=c) if row["done"] else None
    return {
        "visualization_url": str(image) if image else None,
        "topk_url": str(topk.include_query_params(k=TOPK_K)),
        "topk_png_url": str(topk.include_query_params(k=TOPK_K, format="png")),
        "projection_url": str(topk.include_query_params(k=1, rule="deconvnet", format="png")),
        "projection_json_url": str(topk.include_query_params(k=1, rule="deconvnet", images="true")),
    }


@router.get(
    "/atlas/{atlas_id}/channels",
    name="atlas_channels",
    summary="An atlas's layer, per channel: its visualization, top-9 dataset examples and top projection (links)",
    responses=CHANNEL_ERRORS,
)
def atlas_channels(
    atlas_id: AtlasId,
    request: Request,
    settings: SettingsDep,
    layer: AtlasLayer = None,
    channels: Annotated[
        str,
        Query(
            max_length=MAX_CHANNELS_CHARS, description=CHANNELS_HELP, json_schema_extra={"pattern": CHANNELS_PATTERN}
        ),
    ] = "all",
) -> dict[str, Any]:
    """Per channel (the atlas's order, or the order asked): whether it is finished, its `tile` on the layer's
    sheet (row-major in `grid`), the objective and activation its image reached, and links: `visualization_url`
    (its PNG, once finished), `topk_url` / `topk_png_url` (its top-9 dataset examples), `projection_url` /
    `projection_json_url` (the top example's deconvnet projection). The /topk links name the atlas's model by
    id; `sha256` is the weights the atlas rendered, to compare with GET /models/{id} after a retrain."""
    store = atlas_store(settings)
    rec = _read(store, atlas_id)
    spec = AtlasSpec.from_json(rec["spec"])
    chosen = _atlas_layer(atlas_id, spec, layer)
    planned = dict(spec.layers)[chosen]
    asked = channel_list(channels)
    _check_held(atlas_id, chosen, planned, [] if asked == "all" else asked)
    rows = {r["channel"]: r for r in layer_channels(store, atlas_id, spec, chosen)}
    order = planned if asked == "all" else tuple(dict.fromkeys(asked))
    done = sum(r["done"] for r in rows.values())
    model = str(rec.get("model"))
    sheet = request.url_for("atlas_sheet", atlas_id=atlas_id).include_query_params(layer=chosen)
    return {
        "id": atlas_id,
        "model": model,
        "sha256": rec.get("sha256"),
        "status": rec.get("status"),
        **{k: v for k, v in rec["spec"].items() if k != "layers"},
        "layer": chosen,
        "channels_total": len(planned),
        "channels_done": done,
        "complete": done == len(planned),
        "grid": list(grid_shape(done)) if done else [0, 0],
        "links": {
            "status_url": str(request.url_for("get_atlas", atlas_id=atlas_id)),
            "sheet_url": str(sheet) if done else None,  # 409 until a channel is finished
        },
        "channels": [{**rows[c], **_channel_links(request, atlas_id, model, chosen, rows[c])} for c in order],
    }


@router.get(
    "/atlas/{atlas_id}/channel/{layer}/{channel}.png",
    name="atlas_channel_png",
    summary="One channel's feature visualization from an atlas",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **CHANNEL_ERRORS,
        409: {"description": "the chunk holding that channel is not finished yet (the detail gives the progress)"},
    },
)
def atlas_channel_png(
    atlas_id: AtlasId,
    settings: SettingsDep,
    layer: Annotated[
        str,
        Path(
            max_length=64, description="one of the atlas's layers (or the seed's alias)", json_schema_extra=LAYER_ENUM
        ),
    ],
    channel: Annotated[int, Path(ge=0, le=WIDEST - 1, description="a channel the atlas rendered (else 404)")],
    scale: Annotated[
        int, Query(ge=1, le=MAX_CHANNEL_SCALE, description="nearest-neighbour upscale; 1: the image as optimized")
    ] = 1,
) -> Response:
    """The image the atlas rendered for one channel, unlabelled: at scale 1 exactly the pixels it optimized (up to
    8-bit rounding), ready to send back to /predict or /featuremaps."""
    store = atlas_store(settings)
    rec = _read(store, atlas_id)
    spec = AtlasSpec.from_json(rec["spec"])
    chosen = _atlas_layer(atlas_id, spec, layer)
    _check_held(atlas_id, chosen, dict(spec.layers)[chosen], [channel])
    image = channel_image(store, atlas_id, spec, chosen, channel)
    if image is None:
        done = (rec.get("progress") or {}).get("fraction", 0.0)
        raise HTTPException(
            409, f"channel {channel} of {chosen} is not finished yet (atlas {rec.get('status')}, {done:.0%} done)"
        )
    # A finished chunk never changes under its id (the id hashes the weights and every parameter).
    headers = {"X-ConvLens-Model": str(rec.get("model")), "Cache-Control": "max-age=3600"}
    return Response(channel_png(image, scale), media_type="image/png", headers=headers)


@router.delete(
    "/atlas/{atlas_id}",
    responses={
        202: {"description": "running: it stops at its next step, keeping its finished chunks"},
        401: AUTH_401,
        **NOT_FOUND,
        409: {"description": "the atlas already finished"},
    },
    dependencies=[WriteAccess],
)
def cancel_atlas(atlas_id: AtlasId, settings: SettingsDep, response: Response) -> dict[str, Any]:
    """Cancel a queued atlas (200, cancelled now) or a running one (202: it stops at its next step)."""
    store = atlas_store(settings)
    rec = _read(store, atlas_id)
    status = rec.get("status")
    if status in TERMINAL and status != "cancelled":
        raise HTTPException(409, f"atlas {atlas_id} already {status}; there is nothing to cancel")
    if status != "cancelled":
        store.request_cancel(atlas_id)  # the flag first: a worker taking the atlas now still sees it
        if status == "queued" and not (store.dir(atlas_id) / LEASE_FILE).exists():
            status = store.update(atlas_id, status="cancelled", finished=time.time())["status"]
        else:
            response.status_code = 202
    return {"id": atlas_id, "status": status, "cancel_requested": True}
