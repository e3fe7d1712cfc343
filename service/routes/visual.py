"""Routes: looking inside the network. GET /filters, POST /featuremaps, POST /reconstruct, GET /topk.

Every computation that runs the served model with hooks or a recorded forward goes through the micro-batcher's
`call`, so it runs alone on the inference thread (no batched forward beside it) and shares its torch threads.
Formats: `png` (default, the seed's figures), `json` (values, shapes and per-channel statistics) and `npy`
(float32, the raw numbers).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from models import render
from models.errors import InvalidArgument, NoSuchChannel
from models.resnet import CONV_CHOICES, LAYER_CHOICES, WIDEST, ResNet18, canonical_layer, conv_layer, conv_layers
from models.reverse import MODES, RULES, SEEDS, SHORTCUTS, reconstruct, select_channels
from models.visual import TopKIndex, feature_maps, filters, hit_projections, image_patch, receptive_field
from service.deps import BatcherDep, ModelParam, RegistryDep, SettingsDep
from service.grammar import CHANNELS_HELP, CHANNELS_PATTERN, MAX_CHANNELS_CHARS, parse_channels
from service.images import BASE64_IMAGE, ImageLimits, image_request_body, normalize_batch, prepare_uint8, read_uploads
from service.registry import LoadedModel
from service.topk import INDEX_K, Build, TopKService, at_input_size

router = APIRouter(tags=["look inside"])

Format = Literal["png", "json", "npy"]
JSON_MAX_VALUES = 1 << 20  # beyond ~1M numbers JSON is the wrong format (tens of MB): npy says the same in 4 bytes each

IMAGE_BODY = image_request_body(
    "file",
    False,
    {
        "type": "object",
        "required": ["images"],
        "properties": {
            "images": {
                "type": "array",
                "items": BASE64_IMAGE,
                "minItems": 1,
                "maxItems": 1,
                "description": "one base64 image (a data: URL is fine)",
            }
        },
    },
)

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no model with that id"},
    413: {"description": "body or image over the configured limits"},
    415: {"description": "neither multipart/form-data nor application/json"},
    422: {"description": "bad image, unknown layer (the detail lists the valid ones), channel out of range, ..."},
    503: {"description": "no model trained yet, or the dataset the index needs is missing"},
}
PNG_NPY_JSON = {
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description": "npy, float32"},
        "application/json": {},
    }
}

LayerQ = Annotated[
    str,
    Query(
        max_length=64,
        description="conv1, layer1..layer4 (or the seed's conv2_x..conv5_x)",
        examples=["conv1", "layer3", "conv5_x"],
        json_schema_extra={"enum": list(LAYER_CHOICES)},
    ),
]
FormatQ = Annotated[Format, Query(description="png (the figure), json (values + statistics) or npy (float32)")]
# The grammar is stated in the schema and checked by grammar.parse_channels (our message, not pydantic's).
ChannelsQ = Annotated[
    str,
    Query(
        max_length=MAX_CHANNELS_CHARS,
        description=CHANNELS_HELP,
        examples=["all", "top:16", "0,1,2"],
        json_schema_extra={"pattern": CHANNELS_PATTERN},
    ),
]
ScaleQ = Annotated[
    int | None, Query(ge=1, le=16, description="nearest-neighbour upscale per tile; default: tiles of ~32 px")
]


def model_headers(loaded: LoadedModel, **extra: Any) -> dict[str, str]:
    return {"X-ConvLens-Model": loaded.id, **{f"X-ConvLens-{k.title()}": str(v) for k, v in extra.items()}}


def respond(
    fmt: Format,
    loaded: LoadedModel,
    png: Any,
    tensor: torch.Tensor,
    info: dict[str, Any],
    name: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """One of the three formats; `png` is a thunk (only the PNG answer pays for drawing)."""
    hdrs = {**model_headers(loaded), **(headers or {})}
    if fmt == "npy":
        hdrs["Content-Disposition"] = f'attachment; filename="{name}.npy"'
        hdrs["X-ConvLens-Shape"] = ",".join(str(d) for d in tensor.shape)
        return Response(render.npy_bytes(tensor), media_type="application/octet-stream", headers=hdrs)
    if fmt == "json":
        if tensor.numel() > JSON_MAX_VALUES:
            raise InvalidArgument(
                f"format=json would carry {tensor.numel():,} numbers (limit {JSON_MAX_VALUES:,}); "
                "use format=npy, or ask for fewer channels"
            )
        return JSONResponse({"model": loaded.id, **info, **render.tensor_json(tensor)}, headers=hdrs)
    return Response(png(), media_type="image/png", headers=hdrs)


async def one_image(request: Request, settings: SettingsDep, loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's single image as (normalised network input (1, 3, H, W), uint8 (3, s, s) for display)."""
    uploads = await read_uploads(request, settings.max_upload_bytes, 1, field_name="file")
    limits = ImageLimits(settings.max_upload_bytes, settings.max_image_pixels)
    u8 = await run_in_threadpool(prepare_uint8, uploads[0].data, loaded.meta, limits, "the image")
    return normalize_batch(u8.unsqueeze(0), loaded.meta), u8


def shown(u8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The input as the network saw it, in [0, 1] at the projections' size (for side-by-side figures)."""
    img = u8.float() / 255
    if tuple(img.shape[-2:]) != size:
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return img


# ---- GET /filters ----------------------------------------------------------------------------------------------


@router.get(
    "/filters",
    summary="Filters of a conv layer",
    responses={200: PNG_NPY_JSON, **ERRORS},
    response_class=Response,
)
async def get_filters(
    registry: RegistryDep,
    model: ModelParam,
    layer: Annotated[
        str,
        Query(
            max_length=64,
            description="a conv layer by dotted name (conv1, layer2.0.conv1, layer2.0.downsample.0) or a named "
            "layer (its first conv)",
            json_schema_extra={"enum": list(CONV_CHOICES)},
        ),
    ] = "conv1",
    method: Annotated[
        Literal["channels", "rgb"],
        Query(
            description="channels: the seed's method 1, each filter per input channel in a diverging red/blue map "
            "symmetric around 0; rgb: method 2, the 3 input channels fused as colour (conv1 only)"
        ),
    ] = "channels",
    in_channels: Annotated[
        str | None,
        Query(
            max_length=MAX_CHANNELS_CHARS,
            description=f"method=channels: which input channels get a panel: {CHANNELS_HELP}",
            json_schema_extra={"pattern": CHANNELS_PATTERN},
        ),
    ] = None,
    scale: ScaleQ = None,
    format: FormatQ = "png",
) -> Response:
    """A conv layer's weights (out, in, kh, kw): as the seed's figures 5 and 6 (png), or the numbers."""
    loaded = await registry.aget(model)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    w = filters(net, layer)  # UnknownLayer (422) lists the valid names
    chosen = None
    if in_channels is not None:
        spec = parse_channels(in_channels)
        chosen = select_channels(spec, w.abs().sum((0, 2, 3)), what="input channel")  # top:N = largest |W| mass
    if format == "png" and method == "rgb" and w.shape[1] != 3:
        raise InvalidArgument(f"method=rgb needs a conv with 3 input channels (conv1); {layer} has {w.shape[1]}")
    name = next(n for n, m in conv_layers(net).items() if m is conv_layer(net, layer))

    headers = {}
    if format == "png" and method == "channels":
        # A deep conv has more filter tiles than a figure can hold (512 x 512): draw the first panels that fit, in
        # the order asked (top:N is strongest first), and name them, as top:N does past a layer's width.
        drawn = (list(range(w.shape[1])) if chosen is None else chosen)[: max(1, render.MAX_TILES // w.shape[0])]
        if chosen is None or len(drawn) < len(chosen):
            chosen = drawn
        headers["X-ConvLens-Channels"] = _csv(chosen)

    def png() -> bytes:
        if method == "rgb":
            return render.filters_rgb_png(w, scale)
        return render.filters_channels_png(w, chosen, scale)

    info = {"layer": name, "max_abs": float(w.abs().max())}
    data = w if chosen is None else w[:, chosen]
    return await run_in_threadpool(respond, format, loaded, png, data, info, f"filters-{name}", headers)


# ---- POST /featuremaps -----------------------------------------------------------------------------------------


@router.post(
    "/featuremaps",
    summary="Feature maps of a layer for an image",
    openapi_extra=IMAGE_BODY,
    responses={200: PNG_NPY_JSON, **ERRORS},
    response_class=Response,
)
async def post_featuremaps(
    request: Request,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    model: ModelParam,
    layer: LayerQ = "conv1",
    channels: ChannelsQ = "all",
    per_channel: Annotated[
        bool, Query(description="png: scale each map to its own range (default: one range for the layer)")
    ] = False,
    scale: ScaleQ = None,
    format: FormatQ = "png",
) -> Response:
    """The activation (C, h, w) of a named layer (after its ReLU) for one image, as a labelled grid or numbers."""
    canon = canonical_layer(layer)
    spec = parse_channels(channels)
    loaded = await registry.aget(model)
    x, _ = await one_image(request, settings, loaded)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    act = (await batcher.call(lambda: feature_maps(net, x[0], canon))).cpu()
    chosen = select_channels(spec, act.flatten(1).amax(1))
    sub = act[chosen]

    def png() -> bytes:
        return render.activation_grid_png(sub, [str(c) for c in chosen], per_channel, scale)

    info = {"layer": canon, "channels": chosen}
    return await run_in_threadpool(
        respond, format, loaded, png, sub, info, f"featuremaps-{canon}", {"X-ConvLens-Channels": _csv(chosen)}
    )


def _csv(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


# ---- POST /reconstruct -----------------------------------------------------------------------------------------


@router.post(
    "/reconstruct",
    summary="Project a layer's activation back to pixels (the reverse ResNet18)",
    openapi_extra=IMAGE_BODY,
    responses={200: PNG_NPY_JSON, **ERRORS},
    response_class=Response,
)
async def post_reconstruct(
    request: Request,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    model: ModelParam,
    layer: LayerQ = "conv1",
    channels: ChannelsQ = "top:16",
    mode: Annotated[
        Literal["each", "whole"], Query(description="each: one projection per channel; whole: one of them together")
    ] = "each",
    seed: Annotated[
        Literal["activation", "argmax"],
        Query(description="activation: the whole map; argmax: only each channel's strongest position"),
    ] = "activation",
    rule: Annotated[
        Literal["deconvnet", "guided"],
        Query(description="deconvnet: ReLU of the signal (Zeiler-Fergus); guided: also masked by the forward input"),
    ] = "deconvnet",
    shortcut: Annotated[
        Literal["sum", "residual", "identity"],
        Query(description="how the reverse block treats the skip: sum both paths, residual path only, skip only"),
    ] = "sum",
    scale: ScaleQ = None,
    format: FormatQ = "png",
) -> Response:
    """The seed's "reverse ResNet18": the input beside each chosen channel's projection (figures 8-10)."""
    assert mode in MODES and seed in SEEDS and rule in RULES and shortcut in SHORTCUTS
    canon = canonical_layer(layer)
    spec = parse_channels(channels)
    loaded = await registry.aget(model)
    x, u8 = await one_image(request, settings, loaded)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    rec = await batcher.call(lambda: reconstruct(net, x[0], canon, spec, mode, seed, rule, shortcut))
    proj = rec.projections.cpu()
    labels = [f"{c}" for c in rec.channels] if mode == "each" else [f"{len(rec.channels)} ch"]

    def png() -> bytes:
        return render.projection_grid_png(proj, shown(u8, (proj.shape[-2], proj.shape[-1])), labels, scale)

    info = {
        "layer": canon,
        "channels": rec.channels,
        "mode": mode,
        "seed": seed,
        "rule": rule,
        "shortcut": shortcut,
        "activation_shape": list(rec.activation_shape),
        "activation_max": rec.activation_max,
        "activation_mean": rec.activation_mean,
        "argmax": [list(p) for p in rec.argmax],
    }
    rows, cols = render.grid_shape(proj.shape[0] + 1)  # the input is the first tile: the page maps clicks with it
    headers = {"X-ConvLens-Channels": _csv(rec.channels), "X-ConvLens-Grid": f"{rows},{cols}"}
    return await run_in_threadpool(respond, format, loaded, png, proj, info, f"reconstruct-{canon}", headers)


# ---- GET /topk -------------------------------------------------------------------------------------------------


def topk_service(request: Request) -> TopKService:
    svc: TopKService | None = getattr(request.app.state, "topk", None)
    if svc is None:
        settings = request.app.state.settings
        svc = request.app.state.topk = TopKService(settings.home, settings.data_root)
    return svc


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _topk_answer(
    loaded: LoadedModel,
    index: TopKIndex,
    svc: TopKService,
    canon: str,
    channel: int,
    k: int,
    rule: Literal["deconvnet", "guided"],
    shortcut: Literal["sum", "residual", "identity"],
) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[torch.Tensor], int]:
    """The hits with boxes, their image patches in [0, 1] and their projections cut to the same boxes."""
    hits = index.hits(canon, channel)[:k]
    ds, _ = svc.examples(loaded.meta)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    size = int(loaded.meta.get("input_size", ds.images.shape[-1]))
    images = ds.images
    if size != images.shape[-1]:  # resize only the hit images, in place of the whole split
        sel = torch.tensor([h.image for h in hits])
        images = torch.zeros(int(sel.max()) + 1, 3, size, size, dtype=torch.uint8)
        images[sel] = at_input_size(ds.images[sel], size)
    proj = hit_projections(net, images, loaded.meta["mean"], loaded.meta["std"], canon, channel, hits, rule, shortcut)
    proj = proj.cpu()
    out, patches, projs = [], [], []
    for rank, (h, p) in enumerate(zip(hits, proj, strict=True)):
        box = receptive_field(net, canon, h.row, h.col, size, size)
        patches.append(image_patch(images[h.image].float() / 255, box))
        projs.append(image_patch(p, box))
        label = int(ds.labels[h.image]) if h.image < len(ds) else None
        out.append(
            {
                "rank": rank,
                "value": h.value,
                "image": h.image,
                "label": label,
                "class": ds.classes[label] if label is not None and label < len(ds.classes) else None,
                "row": h.row,
                "col": h.col,
                "box": list(box),
            }
        )
    return out, patches, projs, size


@router.get(
    "/topk",
    summary="The dataset images that most activate a channel (Zeiler-Fergus figure 2)",
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}, "application/json": {}}},
        202: {"description": "the index is being built: progress (0..1) and an ETA; retry after Retry-After seconds"},
        **ERRORS,
    },
    response_class=Response,
)
async def get_topk(
    request: Request,
    registry: RegistryDep,
    batcher: BatcherDep,
    model: ModelParam,
    layer: LayerQ = "layer1",
    channel: Annotated[
        int, Query(ge=0, le=WIDEST - 1, description="channel of the layer (one past the layer's width: 404)")
    ] = 0,
    k: Annotated[int, Query(ge=1, le=INDEX_K, description="hits to return, strongest first")] = 9,
    rule: Annotated[Literal["deconvnet", "guided"], Query()] = "deconvnet",
    shortcut: Annotated[Literal["sum", "residual", "identity"], Query()] = "sum",
    images: Annotated[bool, Query(description="json: embed each hit's patch and projection as PNG data URLs")] = False,
    tile: Annotated[int, Query(ge=8, le=256, description="png: pixels per tile")] = 64,
    format: Annotated[Literal["png", "json"], Query()] = "json",
) -> Response:
    """Per hit: its activation, image, position, receptive-field box, the image patch and its argmax projection.

    The index (all channels of every named layer, over the model's validation images) is built on the first
    request in the background: until it is ready the answer is 202 with the build's progress.
    """
    canon = canonical_layer(layer)
    loaded = await registry.aget(model)
    svc = topk_service(request)
    got = await run_in_threadpool(svc.get, loaded)
    if isinstance(got, Build):
        code = 503 if got.error else 202
        return JSONResponse(got.as_json(), status_code=code, headers={"Retry-After": "2", **model_headers(loaded)})
    n = got.values[canon].shape[0] if canon in got.values else 0
    if not 0 <= channel < n:
        raise NoSuchChannel(f"channel {channel} is out of range for {canon}; valid channels are 0..{n - 1}")
    hits, patches, projs, size = await batcher.call(
        lambda: _topk_answer(loaded, got, svc, canon, channel, k, rule, shortcut)
    )

    def draw() -> Response:
        if format == "png":
            return Response(
                render.topk_png(patches, projs, tile), media_type="image/png", headers=model_headers(loaded)
            )
        if images:
            for h, patch, p in zip(hits, patches, projs, strict=True):
                h["patch_png"] = _data_url(render.png_bytes(patch))
                h["projection_png"] = _data_url(render.png_bytes(render.display_projection(p)))
        body = {
            "model": loaded.id,
            "layer": canon,
            "channel": channel,
            "k": len(hits),
            "rule": rule,
            "shortcut": shortcut,
            "input_size": size,
            "split": got.meta.get("split"),
            "num_images": got.num_images,
            "hits": hits,
        }
        return JSONResponse(body, headers=model_headers(loaded))

    return await run_in_threadpool(draw)
