"""The app factory handed to each of several API processes: light to unpickle (no torch, no FastAPI), so a new
process answers its supervisor's health pings while it still loads the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.settings import Settings


@dataclass(frozen=True)
class AppFactory:
    """Builds one API process's app from the parent's settings (uvicorn calls it in the process: `factory=True`)."""

    settings: Settings

    def __call__(self) -> Any:
        from service.server import process_app  # torch and FastAPI load here, in the new process

        return process_app(self.settings)
