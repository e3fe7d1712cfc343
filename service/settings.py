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
    default_model: str | None = Field(None, description="model id served by default (overrides registry.json)")
    model_cache_size: int = Field(4, ge=1, le=64, description="models kept loaded")
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys")
    auth: Literal["writes", "all"] = "writes"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(16_000_000, ge=1024, description="checked from the header, before decoding")
    max_images_per_request: int = Field(64, ge=1, le=4096)
    max_top_k: int = Field(100, ge=1)
    batch_max_size: int = Field(32, ge=1, le=1024, description="largest micro-batch")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a request waits for company")
    torch_threads: int | None = Field(None, ge=1, le=256)

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @property
    def data_root(self) -> Path:
        return self.data_dir or self.home / "data"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own and pass them to create_app)."""
    return Settings()
