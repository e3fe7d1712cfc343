"""Routes: the web page (`/` and `/static/...`) and its gallery of CIFAR test images (`/gallery`).

The page is plain HTML, CSS and JavaScript modules in `service/static/` (no build step) and talks to the server
only through the public HTTP API, so whatever it shows a curl user can get too. The gallery is public API as
well: a bounded list of test images from the configured dataset, and each image as a PNG.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from models.data import ArrayDataset, load_cifar
from models.errors import DatasetMissing
from service.deps import SettingsDep

router = APIRouter()

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
# The page changes with the server: revalidate every time (ETag / Last-Modified make that a 304).
NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

GALLERY_DATASET = "cifar10"
GALLERY_MAX = 200  # images per /gallery answer
GALLERY_DEFAULT = 30
MAX_SCALE = 8


# ---- the page -------------------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)


def static_file(path: str) -> Path:
    """The file under STATIC_DIR that `path` names; 404 for anything else (dot files, `..`, folders, links out)."""
    parts = path.split("/")
    if not path or len(path) > 200 or any(not p or p.startswith(".") or "\\" in p for p in parts):
        raise HTTPException(404, f"no static file {path[:80]!r}")
    root = STATIC_DIR.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file() or target.suffix not in MEDIA_TYPES:
        raise HTTPException(404, f"no static file {path[:80]!r}")
    return target


@router.get("/static/{path:path}", include_in_schema=False)
async def static(path: str) -> FileResponse:
    """The page's scripts, styles and icons."""
    target = static_file(path)
    return FileResponse(target, media_type=MEDIA_TYPES[target.suffix], headers=NO_CACHE)


# ---- the gallery ----------------------------------------------------------------------------------------------


class GalleryImage(BaseModel):
    """One test image: where it is in the split, its true class, and its URL."""

    index: int = Field(description="position in the test split", examples=[3])
    label: int = Field(description="true class index", examples=[0])
    class_name: str = Field(alias="class", description="true class name", examples=["airplane"])
    url: str = Field(description="the image as a PNG", examples=["/gallery/3.png"])


class Gallery(BaseModel):
    """A bounded list of test images, for trying the model on real data."""

    dataset: str = Field(examples=["cifar10"])
    split: str = Field(examples=["test"])
    total: int = Field(description="images in the split")
    classes: list[str]
    images: list[GalleryImage]


_cache: dict[Path, ArrayDataset] = {}
_cache_lock = threading.Lock()


def gallery_dataset(root: Path) -> ArrayDataset:
    """The CIFAR-10 test split under `root`, read once per process (a failure is not cached: data may arrive)."""
    key = root.resolve()
    with _cache_lock:
        ds = _cache.get(key)
        if ds is None:
            try:
                ds = load_cifar(root, GALLERY_DATASET, train=False)
            except DatasetMissing as e:
                raise DatasetMissing(f"the gallery needs the CIFAR-10 test set, which is missing: {e}") from e
            _cache[key] = ds
    return ds


def pick(labels: list[int], num_classes: int, count: int, offset: int, balanced: bool) -> list[int]:
    """`count` indices from `offset` on: in order, or (balanced) round-robin over the classes in index order."""
    idx = list(range(offset, len(labels)))
    if not balanced:
        return idx[:count]
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    need = -(-count // max(num_classes, 1))
    for i in idx:
        lab = labels[i]
        if 0 <= lab < num_classes and len(per_class[lab]) < need:
            per_class[lab].append(i)
            if all(len(p) >= need for p in per_class):
                break
    out = [p[r] for r in range(need) for p in per_class if r < len(p)]
    return out[:count]


def png_of(ds: ArrayDataset, index: int, scale: int) -> bytes:
    img = ds.images[index]
    if scale > 1:
        img = img.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


GALLERY_ERRORS: dict[int | str, dict[str, Any]] = {
    503: {"description": "the dataset is not where the server looks (CONVLENS_DATA_DIR); the detail names the folder"}
}


@router.get("/gallery", response_model=Gallery, tags=["gallery"], responses=GALLERY_ERRORS)
async def gallery(
    settings: SettingsDep,
    count: Annotated[int, Query(ge=1, le=GALLERY_MAX, description="how many images")] = GALLERY_DEFAULT,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="start at this test index")] = 0,
    balanced: Annotated[bool, Query(description="round-robin over the classes (else consecutive images)")] = True,
) -> dict[str, Any]:
    """Real CIFAR-10 test images from the configured dataset (index, true class, PNG URL), for trying the model."""
    ds = await run_in_threadpool(gallery_dataset, settings.data_root)
    labels = ds.labels.tolist()
    chosen = pick(labels, len(ds.classes), count, min(offset, len(labels)), balanced)
    items = [
        {"index": i, "label": labels[i], "class": ds.classes[labels[i]], "url": f"/gallery/{i}.png"} for i in chosen
    ]
    return {"dataset": GALLERY_DATASET, "split": "test", "total": len(labels), "classes": ds.classes, "images": items}


@router.get(
    "/gallery/{index}.png",
    tags=["gallery"],
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        404: {"description": "no test image with that index"},
        **GALLERY_ERRORS,
    },
)
async def gallery_png(
    settings: SettingsDep,
    index: Annotated[int, PathParam(ge=0, le=1_000_000, description="test index (GET /gallery lists some)")],
    scale: Annotated[int, Query(ge=1, le=MAX_SCALE, description="nearest-neighbour upscale")] = 1,
) -> Response:
    """One test image as a PNG (32x32 unless scaled)."""
    ds = await run_in_threadpool(gallery_dataset, settings.data_root)
    if index >= len(ds):
        raise HTTPException(404, f"no test image {index}: the {GALLERY_DATASET} test split has 0..{len(ds) - 1}")
    png = await run_in_threadpool(png_of, ds, index, scale)
    label = int(ds.labels[index])
    headers = {"Cache-Control": "public, max-age=3600", "X-ConvLens-Class": ds.classes[label]}
    return Response(png, media_type="image/png", headers=headers)


# ---- /docs: Swagger UI from the installed swagger-ui-bundle (FastAPI's default loads it from a CDN) ----------

SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def _swagger_dir() -> Path | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(str(swagger_ui_path))


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> Response:
    """Swagger UI ("Authorize" takes the API key) over this server's /openapi.json."""
    from fastapi.openapi.docs import get_swagger_ui_html

    title, redirect = "ConvLens - Swagger UI", "/docs/oauth2-redirect"
    if _swagger_dir() is None:  # not installed: FastAPI's CDN page
        return get_swagger_ui_html(openapi_url="/openapi.json", title=title, oauth2_redirect_url=redirect)
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=title,
        oauth2_redirect_url=redirect,
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon-32x32.png",
    )


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> Response:
    from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html

    return get_swagger_ui_oauth2_redirect_html()


@router.get("/docs-assets/{name}", include_in_schema=False)
async def swagger_asset(name: str) -> Response:
    """The three files /docs needs, from the installed bundle; anything else is a 404."""
    folder = _swagger_dir()
    if folder is None or name not in SWAGGER_FILES:
        raise HTTPException(404, f"no docs asset {name[:64]!r}")
    media = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "png": "image/png"}
    return FileResponse(
        folder / name, media_type=media[name.rsplit(".", 1)[1]], headers={"Cache-Control": "max-age=86400"}
    )
