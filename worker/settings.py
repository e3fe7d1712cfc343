"""The worker's one settings object: the shared fields (jobqueue.settings) plus leases, retries and logging."""

from __future__ import annotations

from pydantic import Field

from jobqueue.settings import DAY_S, CommonSettings


class WorkerSettings(CommonSettings):
    """Every knob of the training worker; `CONVLENS_<NAME>` sets `<name>`."""

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
    tensorboard: bool = Field(True, description="also write TensorBoard event files")

    @property
    def lease_refresh_s(self) -> float:
        # Several refreshes per stale period, so one slow write never makes a live job look lost.
        return max(0.2, min(10.0, self.stale_heartbeat_s / 6))


_current: WorkerSettings | None = None


def use_worker_settings(settings: WorkerSettings) -> None:
    """Make `settings` this process's worker settings (`convlens worker` passes the object built from its options)."""
    global _current
    _current = settings


def get_worker_settings() -> WorkerSettings:
    """The process-wide worker settings: the ones handed to `use_worker_settings`, else read from the environment."""
    global _current
    if _current is None:
        _current = WorkerSettings()
    return _current
