"""The worker's one settings object, read once from CONVLENS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DAY_S = 24 * 3600


class WorkerSettings(BaseSettings):
    """Every knob of the queue and the training worker; `CONVLENS_<NAME>` sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="CONVLENS_", env_file=".env", extra="ignore")

    broker_url: str | None = Field(None, description="e.g. redis://127.0.0.1:6379/0; unset: files under <home>/queue")
    result_backend: str | None = Field(
        None, description="Celery results; default: the Redis broker, else file://<home>/queue/results"
    )
    home: Path = Field(Path("var"), description="the run store shared with the API")
    data_dir: Path | None = Field(None, description="dataset root; default <home>/data")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1")
    queue: str = Field("train", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the training queue")
    visibility_timeout_s: int = Field(
        7 * DAY_S, ge=60, description="Redis redelivers an unacked job after this; longer than any job"
    )
    stale_heartbeat_s: float = Field(
        60.0, gt=0, le=DAY_S, description="a running job whose worker lease is this old is taken as lost"
    )
    max_attempts: int = Field(3, ge=1, le=100, description="a job whose worker is lost this many times fails")
    reconcile_interval_s: float = Field(
        60.0, ge=0, description="seconds between re-checks of the run store while the worker runs (0: start only)"
    )
    requeue_grace_s: float = Field(
        10.0, ge=0, description="a queued run younger than this is never re-sent (the API may be sending it)"
    )
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads; default torch's own")
    tensorboard: bool = Field(True, description="also write TensorBoard event files")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per log line; text")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="the API's keys (CONVLENS_API_KEY): the worker checks none, it only keeps them out of its logs",
    )

    @field_validator("api_key", mode="before")
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
        """The embedded broker's folders and the file result backend."""
        return self.home / "queue"

    @property
    def lease_refresh_s(self) -> float:
        # Several refreshes per stale period, so one slow write never makes a live job look lost.
        return max(0.2, min(10.0, self.stale_heartbeat_s / 6))


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """The process-wide worker settings."""
    return WorkerSettings()
