"""The model registry: which checkpoints can serve, which is the default, and a bounded cache of loaded ones."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoints import atomic_write_json, load_checkpoint, meta_path, read_meta, weights_path
from models.device import resolve_device
from models.errors import CheckpointError, InvalidArgument
from models.runs import RUN_ID_RE, TERMINAL, RunStore, validate_run_id
from service.engine import EngineConfig, Forward, build_engine
from service.errors import ModelNotFound, NoModel

log = logging.getLogger("convlens.registry")

# A source lists (model id, checkpoint stem) pairs; the registry asks every source on each rescan.
ModelSource = Callable[[], Iterable[tuple[str, Path]]]

HOW_TO_TRAIN = (
    "no trained model is available yet: train one with `convlens train` (or `POST /train`), "
    "then it serves here without a restart"
)


@dataclass(frozen=True)
class ModelEntry:
    """A checkpoint that can serve: its id, where it lies, and its metadata."""

    id: str
    stem: Path
    source: str
    meta: dict[str, Any] = field(repr=False)
    mtime_ns: int = 0

    @property
    def created(self) -> float:
        return float(self.meta.get("created") or self.mtime_ns / 1e9)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy of this checkpoint when measured, else its validation accuracy."""
        m = self.meta.get("metrics") or {}
        for key in ("test_acc", "val_acc", "acc"):
            if isinstance(m.get(key), int | float):
                return float(m[key])
        return None


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory (eval mode), with the metadata that says how to feed and name it."""

    id: str
    model: torch.nn.Module = field(repr=False)
    meta: dict[str, Any] = field(repr=False)
    stem: Path
    device: torch.device
    load_seconds: float
    # /predict's forward (logits) when a compiled engine serves it, else None: the eager `model` serves.
    predict_forward: Forward | None = field(default=None, repr=False, compare=False)
    # {engine, precision, gate results, fallback reason}, shown on /models/{id}
    engine: dict[str, Any] = field(default_factory=lambda: {"engine": "torch"}, compare=False)

    @property
    def classes(self) -> list[str]:
        names = self.meta.get("classes") or []
        n = int(self.meta["num_classes"])
        return [str(c) for c in names] if len(names) == n else [str(i) for i in range(n)]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])


class _JsonCache:
    """JSON files re-read only when their mtime changes, so a rescan costs a few stats per run."""

    def __init__(self) -> None:
        self._items: dict[Path, tuple[int, Any]] = {}

    def read(self, path: Path, loader: Callable[[Path], Any] = lambda p: json.loads(p.read_text())) -> Any:
        """The parsed file, or None when it is missing or unreadable (being written right now)."""
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._items.pop(path, None)
            return None
        hit = self._items.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            value = loader(path)
        except (OSError, ValueError, CheckpointError):
            return None
        self._items[path] = (mtime, value)
        return value

    def mtime_ns(self, path: Path) -> int:
        """The mtime of the version last read (0 if never read)."""
        hit = self._items.get(path)
        return hit[0] if hit else 0


def run_store_source(store: RunStore, cache: _JsonCache | None = None) -> ModelSource:
    """Every finished run's best checkpoint, under the run's id (running runs still rewrite theirs)."""
    cache = cache or _JsonCache()

    def scan() -> Iterable[tuple[str, Path]]:
        try:
            dirs = sorted(os.scandir(store.runs_dir), key=lambda d: d.name)
        except OSError:
            return
        for d in dirs:
            if not RUN_ID_RE.fullmatch(d.name):
                continue
            stem = Path(d.path) / "checkpoints" / "best"
            if not meta_path(stem).is_file():
                continue
            run = cache.read(Path(d.path) / "run.json")
            if isinstance(run, dict) and run.get("status") in TERMINAL:
                yield d.name, stem

    return scan


def registry_file_source(store: RunStore) -> ModelSource:
    """Named checkpoints from registry.json's `models` ({name: stem relative to home}), kept inside home."""
    cache = _JsonCache()

    def scan() -> Iterable[tuple[str, Path]]:
        data = cache.read(store.registry_path)
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            return
        home = store.home.resolve()
        for name, rel in models.items():
            stem = (home / str(rel)).resolve()
            if not RUN_ID_RE.fullmatch(str(name)) or not stem.is_relative_to(home):
                log.warning("registry.json: ignoring model %r -> %r (bad name or outside home)", name, rel)
                continue
            yield str(name), stem

    return scan


def checkpoint_dir_source(folder: Path) -> ModelSource:
    """Every `<id>.json` + `<id>.safetensors` pair in a folder (a shipped model directory)."""

    def scan() -> Iterable[tuple[str, Path]]:
        if not folder.is_dir():
            return
        for p in sorted(folder.glob("*.json")):
            if RUN_ID_RE.fullmatch(p.stem) and weights_path(p).is_file():
                yield p.stem, p.with_suffix("")

    return scan


class ModelRegistry:
    """Lists checkpoints from its sources, resolves the default, and keeps up to `cache_size` models loaded."""

    def __init__(
        self,
        store: RunStore,
        extra_sources: Sequence[tuple[str, ModelSource]] = (),
        cache_size: int = 4,
        device: str = "cpu",
        default_model: str | None = None,
        on_load: Callable[[str, float], None] | None = None,
        default_check_s: float = 2.0,
        engine: EngineConfig | None = None,
        warm_sizes: Callable[[torch.device], Sequence[int]] | None = None,
    ) -> None:
        self.store = store
        self.sources: list[tuple[str, ModelSource]] = [
            ("run", run_store_source(store)),
            ("registry", registry_file_source(store)),
            *extra_sources,
        ]
        self.cache_size = cache_size
        self.device = resolve_device(device)
        self.fallback_default = default_model
        self.on_load = on_load
        self.default_check_s = default_check_s
        self.engine = engine or EngineConfig(engine="torch")  # a server passes its own (service.app)
        self.warm_sizes = warm_sizes  # the batch sizes a loaded model is warmed with (a server: Batcher.warm_sizes)
        self._lock = threading.RLock()  # guards entries, cache and scans; never held while loading weights
        self._load_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, ModelEntry] = {}
        self._metas = _JsonCache()
        self._registry_file = _JsonCache()
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._scanned_at = float("-inf")

    # ---- listing -------------------------------------------------------------------------------------------
    def scan(self) -> dict[str, ModelEntry]:
        """Ask every source again (cheap: stats, and JSON re-read only when changed); drop stale cached models."""
        entries: dict[str, ModelEntry] = {}
        with self._lock:
            for source_name, source in self.sources:
                try:
                    pairs = list(source())
                except OSError as e:
                    log.warning("model source %s failed: %s", source_name, e)
                    continue
                for model_id, stem in pairs:
                    if model_id in entries:
                        continue  # the first source to name an id wins: runs, then registry.json, then extras
                    meta = self._metas.read(meta_path(stem), read_meta)
                    if meta is not None:
                        mtime = self._metas.mtime_ns(meta_path(stem))
                        entries[model_id] = ModelEntry(model_id, stem, source_name, meta, mtime)
            for model_id, loaded in list(self._cache.items()):
                now = entries.get(model_id)
                if now is None or now.stem != loaded.stem or now.meta.get("sha256") != loaded.meta.get("sha256"):
                    del self._cache[model_id]  # removed or repointed: the next request loads the new one
            self._entries = entries
            self._scanned_at = time.monotonic()
            return dict(entries)

    def list_models(self) -> list[ModelEntry]:
        """Every model that can serve, newest first (rescans)."""
        return sorted(self.scan().values(), key=lambda e: e.created, reverse=True)

    def entry(self, model_id: str) -> ModelEntry:
        """One model's entry; rescans on a miss so a just-finished run is found; ModelNotFound otherwise."""
        model_id = validate_model_id(model_id)
        with self._lock:
            hit = self._entries.get(model_id)
        if hit is None:
            hit = self.scan().get(model_id)
        if hit is None:
            raise ModelNotFound(f"no model {model_id!r}; GET /models lists the ids that can serve")
        return hit

    # ---- the default ---------------------------------------------------------------------------------------
    def default_id(self) -> str:
        """registry.json's default, else the configured one, else the newest model; NoModel when none exist."""
        with self._lock:
            if time.monotonic() - self._scanned_at > self.default_check_s:
                self.scan()
            entries = self._entries
            data = self._registry_file.read(self.store.registry_path)
            chosen = data.get("default") if isinstance(data, dict) else None
            for candidate in (chosen, self.fallback_default):
                if isinstance(candidate, str) and candidate in entries:
                    return candidate
            if not entries:
                entries = self.scan()
            if not entries:
                raise NoModel(HOW_TO_TRAIN)
            return max(entries.values(), key=lambda e: e.created).id

    def resolve(self, model_id: str | None) -> str:
        """A requested id (validated, must exist) or the default's id."""
        return self.default_id() if model_id is None else self.entry(model_id).id

    def set_default(self, model_id: str) -> ModelEntry:
        """Load the model (so a broken checkpoint is refused), then record it as default in registry.json."""
        entry = self.entry(model_id)
        self.get(entry.id)
        with self._lock:
            path = self.store.registry_path
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            data["default"] = entry.id
            atomic_write_json(path, data)
        return entry

    # ---- loading -------------------------------------------------------------------------------------------
    def cached(self, model_id: str) -> LoadedModel | None:
        """The loaded model if it is in memory (no I/O), marking it recently used."""
        with self._lock:
            hit = self._cache.get(model_id)
            if hit is not None:
                self._cache.move_to_end(model_id)
            return hit

    async def aget(self, model_id: str | None = None) -> LoadedModel:
        """`get` for request handlers: the cached model without a thread hop, else loaded in the thread pool."""
        from starlette.concurrency import run_in_threadpool

        mid = self.resolve(model_id)
        hit = self.cached(mid)
        return hit if hit is not None else await run_in_threadpool(self.get, mid)

    def engine_of(self, model_id: str) -> dict[str, Any] | None:
        """What serves a loaded model's /predict ({engine, precision, gate, fallback_reason}); None if not loaded."""
        with self._lock:
            hit = self._cache.get(model_id)
            return hit.engine if hit is not None else None

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def get(self, model_id: str | None = None) -> LoadedModel:
        """The loaded model (default when None), loading it on a miss; blocking, so call it off the event loop."""
        mid = self.resolve(model_id)
        hit = self.cached(mid)
        if hit is not None:
            return hit
        with self._lock:
            load_lock = self._load_locks.setdefault(mid, threading.Lock())
        with load_lock:  # one load per id even when many requests miss at once
            hit = self.cached(mid)
            if hit is not None:
                return hit
            loaded = self._load(self.entry(mid))
            with self._lock:
                self._cache[mid] = loaded
                while len(self._cache) > self.cache_size:
                    # Requests already holding an evicted model keep their reference and finish with it.
                    self._cache.popitem(last=False)
        return loaded

    def _load(self, entry: ModelEntry) -> LoadedModel:
        t0 = time.perf_counter()
        model, meta = load_checkpoint(entry.stem, self.device)
        size = int(meta.get("input_size", 32))
        # Warm-up: the first forward of each shape allocates (and on CUDA, picks kernels); keep that off users'
        # requests. The batcher says which shapes its forwards take on this device.
        warm = self.warm_sizes(self.device) if self.warm_sizes else (1,)
        with torch.inference_mode():
            for n in warm:
                model(torch.zeros(n, 3, size, size, device=self.device))
        forward, engine = build_engine(model, meta, entry.stem, self.device, self.engine)
        dt = time.perf_counter() - t0
        log.info("loaded model %s from %s in %.2fs (/predict: %s)", entry.id, entry.stem, dt, engine["engine"])
        if self.on_load:
            self.on_load(entry.id, dt)
        return LoadedModel(entry.id, model, meta, entry.stem, self.device, dt, forward, engine)


def validate_model_id(model_id: str) -> str:
    """Model ids follow run ids' rules (they name folders); the message speaks of models."""
    try:
        return validate_run_id(model_id)
    except InvalidArgument as e:
        raise InvalidArgument(str(e).replace("run id", "model id")) from e
