"""The API's one settings object, read once from CONVLENS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the API server; `CONVLENS_<NAME>` sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="CONVLENS_", env_file=".env", extra="ignore")

    home: Path = Field(Path("var"), description="the run store (checkpoints, runs, registry.json)")
    data_dir: Path | None = Field(None, description="dataset root; default <home>/data")
    broker_url: str | None = Field(None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset: embedded")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda")
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
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys")
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
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch CPU threads per API process; default: the usable cores minus one per process, shared out",
    )
    access_log: bool = Field(True, description="one log line per request (method, path, status, ms, request id)")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per log line; text")
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

    @field_validator("api_key", "cors_origins", "model_dirs", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @property
    def data_root(self) -> Path:
        return self.data_dir or self.home / "data"

    @property
    def queue_dir(self) -> Path:
        """The embedded broker's folders (used when no broker_url is set)."""
        return self.home / "queue"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own and pass them to create_app)."""
    return Settings()
