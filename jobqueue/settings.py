"""The settings both processes read: the run store, the queue, the device, logging and secrets.

`service.settings.Settings` (the API) and `worker.settings.WorkerSettings` (the worker) extend this class, so a
field both need is declared once and `CONVLENS_<NAME>` means the same thing to both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobqueue.contract import DEFAULT_QUEUE, QUEUE_NAME_RE

DEFAULT_HOME = Path("var")
DAY_S = 24 * 3600
LogFormat = Literal["auto", "json", "text"]


def split_commas(v: object) -> object:
    """`a, b,,c` -> ["a", "b", "c"]: list settings are comma-separated in the environment."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


class CommonSettings(BaseSettings):
    """What the API and the worker share; `CONVLENS_<NAME>` sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="CONVLENS_", env_file=".env", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="the run store shared by the API and the worker")
    data_dir: Path | None = Field(None, description="dataset root; default <home>/data")
    broker_url: str | None = Field(None, description="e.g. redis://127.0.0.1:6379/0; unset: files under <home>/queue")
    result_backend: str | None = Field(
        None, description="Celery results; default: the Redis broker, else file://<home>/queue/results"
    )
    queue: str = Field(DEFAULT_QUEUE, pattern=QUEUE_NAME_RE, description="the training queue")
    visibility_timeout_s: int = Field(
        7 * DAY_S, ge=60, description="Redis redelivers an unacked job after this; longer than any job"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: see each process)")
    log_format: LogFormat = Field(
        "auto", description="auto: text on a terminal, JSON otherwise (containers, files); json; text"
    )
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated API keys (the worker checks none: it keeps them out of logs)"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return split_commas(v)

    @property
    def data_root(self) -> Path:
        return self.data_dir or self.home / "data"

    @property
    def queue_dir(self) -> Path:
        """The embedded broker's folders and the file result backend (used when no broker_url is set)."""
        return self.home / "queue"
