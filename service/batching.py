"""Micro-batching: one inference thread gathers concurrent requests into one forward pass per model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from service.errors import Overloaded
from service.images import normalize_batch
from service.metrics import Metrics
from service.registry import LoadedModel

log = logging.getLogger("convlens.batching")
T = TypeVar("T")


def padded_sizes(max_batch: int) -> list[int]:
    """The batch sizes a CUDA forward is padded to: powers of two below `max_batch`, and `max_batch`.

    cuDNN picks and builds its kernels once per input shape, and that first call costs far more than the forward;
    a queue forms every size from 1 to max_batch, so unpadded a server pays that cost again and again under load.
    Padded, a handful of shapes cover every batch and each is warmed when the model loads (Batcher.warm_sizes).
    """
    return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]


def padded_size(n: int, max_batch: int) -> int:
    """The smallest of padded_sizes(max_batch) that holds n images (n <= max_batch)."""
    return next(s for s in padded_sizes(max_batch) if s >= n)


@dataclass(eq=False)
class _Job:
    """One request's images for one model, and where its answer goes."""

    model: LoadedModel
    x: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(self.x.shape[0])


@dataclass(eq=False)
class _Call:
    """A callable to run alone on the inference thread (e.g. a hooked forward), between batches."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    n: int = 0


def _settle(pairs: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    """Runs on the event loop: resolve futures whose requests are still waiting."""
    for fut, value, failed in pairs:
        if fut.done():
            continue  # the client went away and its request was cancelled
        if failed:
            fut.set_exception(value)
        else:
            fut.set_result(value)


class Batcher:
    """Collects up to `max_batch` images or for up to `max_wait_ms` after the first, then runs one forward."""

    def __init__(
        self,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        max_queue: int = 2048,
        metrics: Metrics | None = None,
        pad_devices: tuple[str, ...] = ("cuda",),
    ) -> None:
        self.max_batch = max_batch
        self.pad_devices = pad_devices  # device types whose forwards are padded to padded_sizes(max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._q: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="convlens-inference", daemon=True)
        self._closed = False

    def warm_sizes(self, device: torch.device) -> tuple[int, ...]:
        """The batch sizes to warm a model on `device` with at load (ModelRegistry's `warm_sizes`): every shape
        this batcher pads its forwards to there, else one image, the shape of a first request."""
        return tuple(padded_sizes(self.max_batch)) if device.type in self.pad_devices else (1,)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Images waiting for a forward pass."""
        return self._depth

    async def predict(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (n, num_classes, float32, CPU) for inputs (n, 3, H, W).

        `x` is either the network input (float) or uint8 images at the dataset size, which the inference
        thread normalises once per batch (service.images.normalize_batch) instead of once per request.
        """
        if self._closed:
            raise Overloaded("the server is shutting down; retry on another instance")
        n = int(x.shape[0])
        with self._depth_lock:
            if self._depth and self._depth + n > self.max_queue:
                raise Overloaded(f"{self._depth} images are already waiting for inference; retry in a moment")
            self._depth += n
        self._gauge()
        loop = asyncio.get_running_loop()
        job = _Job(model, x, loop.create_future())
        self._q.put(job)
        return await job.future

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the inference thread, alone: no batched forward runs beside it (safe for hooks)."""
        loop = asyncio.get_running_loop()
        c = _Call(fn, loop.create_future())
        self._q.put(c)
        result: T = await c.future
        return result

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._depth)

    def _take(self, n: int) -> None:
        with self._depth_lock:
            self._depth -= n
        self._gauge()

    # ---- the inference thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        carry: _Job | _Call | None = None
        stopping = False
        while not stopping:
            first = carry if carry is not None else self._q.get()
            carry = None
            if first is None:
                break
            if isinstance(first, _Call):
                self._run_call(first)
                continue
            jobs, n = [first], first.n
            deadline = time.monotonic() + self.max_wait
            # Requests that queued while the last forward ran are taken at once; the wait only applies when the
            # queue runs dry before the batch is full.
            while n < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if isinstance(nxt, _Call) or n + nxt.n > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                n += nxt.n
            self._take(n)
            self._run_jobs(jobs)
        self._drain()

    def _run_jobs(self, jobs: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for j in jobs:
            groups.setdefault(id(j.model), []).append(j)  # one forward per loaded model object
        for group in groups.values():
            live = [j for j in group if not j.future.done()]
            if not live:
                continue
            model = live[0].model
            try:
                probs = self._forward(model, self._inputs(model, [j.x for j in live]))
                out: list[tuple[asyncio.Future[Any], Any, bool]] = []
                i = 0
                for j in live:
                    out.append((j.future, probs[i : i + j.n], False))
                    i += j.n
            except Exception as e:  # a failing forward answers its requests; the thread lives on
                log.exception("forward pass of model %s failed", model.id)
                out = [(j.future, e, True) for j in live]
            if self.metrics:
                self.metrics.images.labels(model.id).inc(sum(j.n for j in live))
            self._deliver(out)

    @staticmethod
    def _inputs(model: LoadedModel, xs: list[torch.Tensor]) -> torch.Tensor:
        if model.device.type != "cpu":
            # uint8 crosses to the GPU (a quarter of float32's bytes) and is normalised and resized there.
            xs = [x.to(model.device, non_blocking=True) for x in xs]
        if len({x.dtype for x in xs}) > 1:
            xs = [normalize_batch(x, model.meta) if x.dtype == torch.uint8 else x for x in xs]
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        return normalize_batch(x, model.meta) if x.dtype == torch.uint8 else x

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        parts = []
        with torch.inference_mode():
            for chunk in x.split(self.max_batch):  # a single huge request still runs in bounded batches
                t0 = time.perf_counter()
                forward = model.predict_forward or model.model
                n = int(chunk.shape[0])  # _inputs has put the batch on the model's device
                if model.device.type in self.pad_devices:
                    chunk = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, padded_size(n, self.max_batch) - n))
                logits = forward(chunk)[:n]
                parts.append(torch.softmax(logits.float(), dim=1).cpu())
                if self.metrics:
                    self.metrics.batch_seconds.observe(time.perf_counter() - t0)
                    self.metrics.batch_size.observe(int(chunk.shape[0]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run_call(self, c: _Call) -> None:
        try:
            pair: tuple[asyncio.Future[Any], Any, bool] = (c.future, c.fn(), False)
        except Exception as e:
            pair = (c.future, e, True)
        self._deliver([pair])

    @staticmethod
    def _deliver(out: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]] = {}
        for item in out:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():  # one wake-up of each event loop per batch, not one per request
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, items)

    def _drain(self) -> None:
        """Fail whatever is still queued after close()."""
        out: list[tuple[asyncio.Future[Any], Any, bool]] = []
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                out.append((job.future, Overloaded("the server is shutting down; retry"), True))
        self._deliver(out)
