"""The API's one settings object: the shared fields (jobqueue.settings) plus the server's own knobs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from jobqueue.settings import CommonSettings, split_commas


class Settings(CommonSettings):
    """Every knob of the API server; `CONVLENS_<NAME>` sets `<name>`."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    default_model: str | None = Field(
        None, description="model id served by default when registry.json names none (POST /models/{id}/default)"
    )
    shipped_models: bool = Field(
        True, description="serve the model shipped in the package (models/weights), the default when none is chosen"
    )
    model_cache_size: int = Field(4, ge=1, le=64, description="models kept loaded")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="comma-separated extra folders of <id>.json + <id>.safetensors (shipped)"
    )
    auth: Literal["writes", "all"] = "writes"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_url_bytes: int = Field(
        16384, ge=256, le=65536, description="longest path + query string, percent-encoded; longer: 414"
    )
    max_image_pixels: int = Field(16_000_000, ge=1024, description="checked from the header, before decoding")
    max_images_per_request: int = Field(64, ge=1, le=4096)
    max_top_k: int = Field(100, ge=1)
    # Defaults measured with bench/serve_predict.py (see its docstring): the batch takes whatever queued during
    # the previous forward pass, so waiting only adds latency at low load; 64 is the bare model's best size.
    batch_max_size: int = Field(64, ge=1, le=1024, description="largest micro-batch (images)")
    batch_max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a batch waits for more requests once the queue runs dry"
    )
    max_queue_images: int = Field(2048, ge=1, description="images waiting for inference before 503 + Retry-After")
    api_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes sharing the port (`serve`), each with its own event loop, batcher and models",
    )
    access_log: bool = Field(True, description="one log line per request (method, path, status, ms, request id)")
    max_sse_per_client: int = Field(
        8, ge=1, le=10_000, description="open GET /jobs/{id}/events streams one client IP may hold; past it 429"
    )
    shutdown_timeout_s: int = Field(
        10,
        ge=1,
        le=3600,
        description="on SIGTERM/Ctrl-C, how long requests in flight may take to finish (event streams end at once)",
    )
    embedded_worker: bool = Field(True, description="`serve` also starts a local worker when no broker is set")
    predict_engine: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="what runs /predict's forward: auto (OpenVINO on the CPU when installed, torch on CUDA), "
        "torch, openvino; checked against torch at model load, torch when the check or the export fails",
    )
    predict_precision: Literal["auto", "f32", "bf16", "int8"] = Field(
        "f32",
        description="the engine's precision: f32 (answers equal torch's), bf16 (faster on CPUs with bf16 "
        "instructions; refused past a 0.2-point validation accuracy change), int8 (OpenVINO quantized by NNCF, "
        "calibrated on training images; the same gate, else f32), auto (bf16 where that gate passes)",
    )
    predict_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="the engine's CPU threads in each API process (default: CONVLENS_TORCH_THREADS when set, else "
        "the cores shared out among the API processes)",
    )
    predict_gate_images: int = Field(
        10_000, ge=0, le=100_000, description="validation images the engine's gate compares with torch at export"
    )

    @field_validator("cors_origins", "model_dirs", mode="before")
    @classmethod
    def _split_lists(cls, v: object) -> object:
        return split_commas(v)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own and pass them to create_app)."""
    return Settings()
