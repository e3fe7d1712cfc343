"""The container files: static checks that keep them in step with the code (always run), and the Docker
end-to-end proof (scripts/docker-e2e.sh), which runs only with CONVLENS_DOCKER_E2E=1."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from worker.settings import WorkerSettings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = {"CONVLENS_HOME", "CONVLENS_DATA_DIR", "CONVLENS_BROKER_URL", "CONVLENS_HOST", "CONVLENS_PORT"}


def _env_names(cls: type[Settings] | type[WorkerSettings]) -> set[str]:
    return {f"CONVLENS_{name.upper()}" for name in cls.model_fields}


def _compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())  # type: ignore[no-any-return]


def _service_env(service: dict[str, Any]) -> set[str]:
    env = service.get("environment") or []
    items = env if isinstance(env, list) else [f"{k}={v}" for k, v in env.items()]
    return {str(e).split("=", 1)[0] for e in items}


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(CONVLENS_[A-Z0-9_]+)=", text, flags=re.M))
    missing = (_env_names(Settings) | _env_names(WorkerSettings)) - documented
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_compose_passes_every_setting_to_api_and_worker() -> None:
    services = _compose()["services"]
    wanted = _env_names(Settings) | _env_names(WorkerSettings)
    for name in ("api", "worker"):
        missing = wanted - {"CONVLENS_EMBEDDED_WORKER"} - _service_env(services[name])
        assert not missing, f"{name} does not pass {sorted(missing)}"
    cpu_worker = _compose("docker-compose.cpu.yml")["services"]["worker-cpu"]
    missing = _env_names(WorkerSettings) - _service_env(cpu_worker)
    assert not missing, f"worker-cpu does not pass {sorted(missing)}"


def test_compose_shape() -> None:
    c = _compose()
    s = c["services"]
    redis_cmd = " ".join(s["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert s["redis"]["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert s[name]["image"] == s["api"]["image"]  # one image, two commands
        assert {v.split(":")[1] for v in s[name]["volumes"]} == {"/var/lib/convlens", "/data"}
    assert s["worker"]["command"][:2] == ["convlens", "worker"]
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert s["flower"]["profiles"] == ["flower"]
    assert any(p.endswith(":8000") for p in s["api"]["ports"])
    assert set(c["volumes"]) >= {"convlens-home", "convlens-data", "redis-data"}
    cpu = _compose("docker-compose.cpu.yml")["services"]
    assert cpu["worker"]["profiles"] == ["gpu"] and "deploy" not in cpu["worker-cpu"]


def test_dockerfile_matches_pyproject() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, flags=re.M)
    assert re.search(r"^USER convlens$", text, flags=re.M) and "HEALTHCHECK" in text
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.startswith(("torch==", "torchvision==")))
    assert f"ARG TORCH_VERSION={pins['torch']}" in text
    assert f"ARG TORCHVISION_VERSION={pins['torchvision']}" in text


def test_dockerignore_allows_only_what_the_dockerfile_copies() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    # Every source of a COPY from the build context (not --from a stage), so the two files cannot drift apart.
    copies = [x.split()[1:-1] for x in (ROOT / "Dockerfile").read_text().splitlines() if x.startswith("COPY ")]
    copied = {src.rstrip("/") for srcs in copies if not srcs[0].startswith("--from=") for src in srcs}
    assert copied == allowed, f"Dockerfile copies {sorted(copied)}; .dockerignore lets in {sorted(allowed)}"
    assert {"models", "service", "worker", "jobqueue", "convlens"} <= copied  # every package the wheel holds


E2E = os.environ.get("CONVLENS_DOCKER_E2E") == "1"


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    not E2E,
    reason="builds a multi-GB image and runs the compose stack (minutes): set CONVLENS_DOCKER_E2E=1 "
    "with a running Docker engine, or run `make docker-e2e`",
)
def test_docker_compose_end_to_end() -> None:
    if shutil.which("docker") is None:
        pytest.fail("CONVLENS_DOCKER_E2E=1 but there is no docker command")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-e2e.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3500,
    )
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout
