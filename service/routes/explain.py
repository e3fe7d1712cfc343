"""Route: POST /explain, the Grad-CAM family, gradients, integrated gradients, occlusion, deconvnet and guided
backprop for one image, several methods sharing one forward (and backward) pass."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from models import explain_render, render
from models.errors import InvalidArgument
from models.explain import ALIASES, LAYER_METHODS, METHODS, PARAMS, Explanation, explain, resolve_params
from models.resnet import LAYER_CHOICES, ResNet18, cam_layer, canonical_layer
from service.deps import BatcherDep, ModelParam, RegistryDep, SettingsDep
from service.grammar import METHODS_PATTERN, TARGET_PATTERN, explain_params_schema, parse_methods, parse_target
from service.routes.visual import ERRORS, IMAGE_BODY, one_image, shown

router = APIRouter(tags=["explain"])

MAX_PARAM_QUERY = 64  # `method.param=value` query entries per request
PARAM_DOC = "; ".join(
    f"{m}: " + (", ".join(f"{k} (default {p.default})" for k, p in specs.items()) or "none")
    for m, specs in PARAMS.items()
)


def _value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def method_params(request: Request, methods: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`occlusion.patch=8`-style query entries, and/or a `params` JSON object {method: {param: value}}."""
    out: dict[str, dict[str, Any]] = {}
    raw = request.query_params.get("params")
    if raw:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
            raise InvalidArgument(f'params is not valid JSON ({e}); e.g. {{"occlusion": {{"patch": 8}}}}') from e
        if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
            raise InvalidArgument('params must be a JSON object {"method": {"param": value}}')
        if unknown := [m for m in doc if m not in METHODS]:
            raise InvalidArgument(f"params: {str(unknown[0])[:40]!r} is not a method; methods: {', '.join(METHODS)}")
        for m, d in doc.items():
            out.setdefault(str(m), {}).update(d)
    dotted = [(k, v) for k, v in request.query_params.multi_items() if "." in k]
    if len(dotted) > MAX_PARAM_QUERY:
        raise InvalidArgument(f"too many method parameters ({len(dotted)}); the limit is {MAX_PARAM_QUERY}")
    for key, value in dotted:
        m, _, p = key.partition(".")
        out.setdefault(ALIASES.get(m, m), {})[p] = _value(value)
    asked = {ALIASES.get(m, m) for m in methods}
    for m, given in out.items():
        if ALIASES.get(m, m) not in METHODS:
            raise InvalidArgument(f"parameters given for {m!r}, which is not a method; methods: {', '.join(METHODS)}")
        resolve_params(m, given)  # checked even when unused: a bad value is an error either way
    used = {m: p for m, p in out.items() if ALIASES.get(m, m) in asked}
    # Parameters for a method not asked are set aside, not refused (a page or script may keep one params object
    # for every method); the answer's X-ConvLens-Unused-Params header names them.
    return used, sorted(m for m in out if m not in used)


def _explanation_json(e: Explanation, classes: list[str]) -> dict[str, Any]:
    heat = e.heatmap[0].detach().to("cpu", torch.float32)
    out: dict[str, Any] = {
        "target": e.targets[0],
        "target_class": classes[e.targets[0]] if e.targets[0] < len(classes) else None,
        "layer": e.layer,
        "params": e.params,
        "heatmap": {"shape": list(heat.shape), "values": heat.tolist()},
    }
    if e.attribution is not None:
        out["attribution_shape"] = list(e.attribution.shape[1:])
    extras = {}
    for k, v in e.extras.items():
        t = v[0] if v.dim() > 0 and v.shape[0] == e.heatmap.shape[0] else v
        extras[k] = t.detach().to("cpu", torch.float32).tolist()
    if extras:
        out["extras"] = extras
    return out


MethodQuery = Annotated[
    str,
    Query(
        max_length=512,
        description=f"comma-separated, or `all`: {', '.join(METHODS)} (aliases: "
        + ", ".join(f"{a}={m}" for a, m in ALIASES.items())
        + f"). Layer-dependent: {', '.join(LAYER_METHODS)}",
        examples=["gradcam", "gradcam,saliency,occlusion", "all"],
        json_schema_extra={"pattern": METHODS_PATTERN},
    ),
]
TargetQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="class name or index to explain, or `predicted` (the default); a class the model lacks: 404",
        json_schema_extra={"pattern": TARGET_PATTERN},
    ),
]
LayerQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="layer for the CAM methods and occlusion; default: the model's `cam_layer` (GET /models/{id}), "
        "the deepest named layer whose map is at least 4x4 at the model's input size",
        examples=["layer3", "conv5_x"],
        json_schema_extra={"enum": list(LAYER_CHOICES)},
    ),
]
# `params` is read from the query string by method_params (beside the `method.param=value` entries), so it is
# declared here as what it is, a JSON object with its schema, rather than as a free-form string parameter.
PARAMS_PARAMETER = {
    "name": "params",
    "in": "query",
    "required": False,
    "description": "method parameters as JSON {method: {param: value}} (for methods asked in `method`); or query "
    f"entries `method.param=value`. Parameters: {PARAM_DOC}",
    "content": {"application/json": {"schema": explain_params_schema()}},
}
ViewQuery = Annotated[
    Literal["figure", "overlay", "heatmap"],
    Query(
        description="png: figure (input + each method, overlay above heatmap), or the overlay/heatmap of one "
        "method (the first asked)"
    ),
]
CmapQuery = Annotated[Literal["jet", "inferno", "viridis", "magma", "turbo", "hot", "gray"], Query()]
AlphaQuery = Annotated[float, Query(ge=0, le=1, description="overlay opacity of the heatmap")]
SizeQuery = Annotated[int | None, Query(ge=32, le=512, description="png: displayed size of each tile (pixels)")]
FormatQuery = Annotated[Literal["png", "json", "npy"], Query()]


@dataclass(frozen=True)
class _Drawing:
    """How the answer is drawn: format, and for png the view, colour map, overlay opacity and tile size."""

    format: str
    view: str
    cmap: str
    alpha: float
    size: int | None


@router.post(
    "/explain",
    summary="Explain a prediction: Grad-CAM, Grad-CAM++, guided Grad-CAM, saliency, SmoothGrad, IG, occlusion, ...",
    openapi_extra={**IMAGE_BODY, "parameters": [PARAMS_PARAMETER]},
    responses={
        200: {
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {},
            }
        },
        **ERRORS,
    },
    response_class=Response,
)
async def post_explain(
    request: Request,
    registry: RegistryDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    model: ModelParam,
    method: MethodQuery = "gradcam",
    target: TargetQuery = None,
    layer: LayerQuery = None,
    view: ViewQuery = "figure",
    cmap: CmapQuery = "jet",
    alpha: AlphaQuery = 0.5,
    size: SizeQuery = None,
    format: FormatQuery = "png",
) -> Response:
    """Heatmaps (on the input grid) of why the model gives `target` for the image; npy: (methods, H, W) float32."""
    methods = parse_methods(method)
    canon = canonical_layer(layer) if layer is not None else None
    extra, unused = method_params(request, methods)
    loaded = await registry.aget(model)
    tgt = parse_target(target, loaded.classes)
    x, u8 = await one_image(request, settings, loaded)
    net: ResNet18 = loaded.model  # type: ignore[assignment]
    canon = canon or cam_layer(net.stem, int(loaded.meta.get("input_size", 32)))
    mean, std = loaded.meta["mean"], loaded.meta["std"]
    found = await batcher.call(lambda: explain(net, x, methods, tgt, canon, extra, mean, std))
    drawing = _Drawing(format, view, cmap, alpha, size)
    answer = await run_in_threadpool(lambda: _answer(found, loaded.id, loaded.classes, u8, drawing))
    if unused:
        answer.headers["X-ConvLens-Unused-Params"] = ",".join(unused)
    return answer


def _answer(
    found: dict[str, Explanation], model_id: str, classes: list[str], u8: torch.Tensor, d: _Drawing
) -> Response:
    """The explanations as npy, JSON or a PNG (figure, overlay or heatmap), with headers naming what was done."""
    names = list(found)
    first = found[names[0]]
    shared = first.probabilities
    assert shared is not None  # explain() sets it on every method's result
    probs = shared[0].detach().float().cpu()
    top = int(probs.argmax())
    headers = {
        "X-ConvLens-Model": model_id,
        "X-ConvLens-Methods": ",".join(names),
        "X-ConvLens-Predicted": classes[top],
        "X-ConvLens-Target": classes[first.targets[0]],
    }
    if d.format == "npy":
        heat = torch.stack([found[m].heatmap[0].detach().float().cpu() for m in names])
        headers["Content-Disposition"] = 'attachment; filename="explain.npy"'
        return Response(render.npy_bytes(heat), media_type="application/octet-stream", headers=headers)
    if d.format == "json":
        body = {
            "model": model_id,
            "target": first.targets[0],
            "target_class": classes[first.targets[0]],
            "predicted": {"index": top, "name": classes[top], "probability": float(probs[top])},
            "target_probability": float(probs[first.targets[0]]),
            "methods": {m: _explanation_json(found[m], classes) for m in names},
        }
        return JSONResponse(body, headers=headers)
    heat0 = first.heatmap[0].detach().float().cpu()
    img = shown(u8, (heat0.shape[-2], heat0.shape[-1]))
    if d.view == "overlay":
        png = explain_render.overlay_png(img, heat0, d.cmap, d.alpha, d.size)
    elif d.view == "heatmap":
        png = explain_render.heatmap_png(heat0, d.cmap, d.size)
    else:
        cpu = {
            m: Explanation(e.method, e.heatmap.detach().float().cpu(), e.targets, layer=e.layer)
            for m, e in found.items()
        }
        png = explain_render.figure_png(img, cpu, 0, classes, d.cmap, d.alpha, d.size)
    return Response(png, media_type="image/png", headers=headers)
