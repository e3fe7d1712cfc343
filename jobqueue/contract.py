"""Names both sides of the queue agree on: the task, the default queue, the lease file, the run statuses."""

from __future__ import annotations

from models.runs import STATUSES, TERMINAL, RunStatus

TRAIN_TASK = "convlens.train"
# Renders a feature-visualization atlas (worker/atlas.py); same queue as training, task id = atlas id.
ATLAS_TASK = "convlens.atlas"
DEFAULT_QUEUE = "train"
QUEUE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A worker holds this file in a run's folder while it trains the run (worker/reconcile.py writes and refreshes
# it); the API reads only whether it exists, to tell "queued and nobody has it" from "being taken right now".
LEASE_FILE = "lease"

# Statuses in which the worker will not train a run again when it is delivered (a failed one is retried only by
# asking for it: `convlens train --resume`).
NOT_RESUMED = ("succeeded", "cancelled")

__all__ = [
    "ATLAS_TASK",
    "DEFAULT_QUEUE",
    "LEASE_FILE",
    "NOT_RESUMED",
    "QUEUE_NAME_RE",
    "STATUSES",
    "TERMINAL",
    "TRAIN_TASK",
    "RunStatus",
]
