"""docker/docker-compose.yml and docker/Dockerfile agree with the code (no Docker engine runs here:
the files are parsed and checked against what backend/*.py reads and accepts)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
APP_SERVICES = ("backend", "worker", "scheduler")
# env names that are set for the service but read by third-party code, not by backend/*.py
FOREIGN_ENV: set[str] = set()
# the names issue 4 fixes for deployments
REQUIRED_ENV = {"REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "WORKERS", "THREADS",
                "LOG_LEVEL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}

ENV_READ = re.compile(
    r"""(?:\bget|\bgetenv|\bsetdefault|_env\w*)\(\s*["']([A-Z][A-Z0-9_]{2,})["']"""   # os.environ.get("X"), e.get("X")
    r"""|environ\[\s*["']([A-Z][A-Z0-9_]{2,})["']\s*\]""")                          # os.environ["X"]


def env_names_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "backend").rglob("*.py"):
        for m in ENV_READ.finditer(path.read_text()):
            names.add(m.group(1) or m.group(2))
    return names


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def test_services_volumes_and_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker", "scheduler", "dashboard"}
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no health check"
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    assert any(v.endswith(":/data/model_dir") for v in services["backend"]["volumes"])
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_env_names_agree_with_the_code(compose):
    read = env_names_read_by_code()
    assert REQUIRED_ENV <= read, f"backend/*.py does not read {sorted(REQUIRED_ENV - read)}"
    services = compose["services"]
    backend_env = _env(services["backend"])
    assert REQUIRED_ENV <= set(backend_env), sorted(REQUIRED_ENV - set(backend_env))
    for name in APP_SERVICES:
        env = _env(services[name])
        unknown = set(env) - read - FOREIGN_ENV
        assert not unknown, f"{name} sets env names no code reads: {sorted(unknown)}"
        for needed in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR"):
            assert needed in env, f"{name} lacks {needed}"
        assert env["MODEL_DIR"] == "/data/model_dir"


def test_urls_and_ports_point_at_the_services(compose):
    services = compose["services"]
    from backend.web.runner import DEFAULT_PORT

    for name in APP_SERVICES:
        env = _env(services[name])
        redis_url = urlparse(env["REDIS_URL"])
        assert redis_url.scheme == "redis" and redis_url.hostname in services
        assert redis_url.port in _container_ports(services[redis_url.hostname]) | {6379}
        ls_url = urlparse(env["LABEL_STUDIO_URL"])
        assert ls_url.hostname == "label-studio" and ls_url.port in _container_ports(services["label-studio"])
        deps = services[name].get("depends_on", {})
        assert "redis" in deps and deps["redis"].get("condition") == "service_healthy"
    backend = services["backend"]
    cmd = backend["command"]
    assert cmd[:3] == ["python", "-m", "backend.serve"]
    port = int(cmd[cmd.index("--port") + 1])
    assert port == DEFAULT_PORT and port in _container_ports(backend)
    assert str(port) in " ".join(backend["healthcheck"]["test"])


def test_worker_and_scheduler_commands_parse(compose):
    from backend.cli.worker import build_parser

    services = compose["services"]
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:3] == ["python", "-m", "backend.worker"]
    args = build_parser().parse_args(worker_cmd[3:])
    assert args.device.startswith("cuda") and not args.scheduler
    assert args.queues == ["interactive", "batch", "train"]
    sched = build_parser().parse_args(services["scheduler"]["command"][3:])
    assert sched.scheduler
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert _env(services["worker"])["TAG2MASK_DEVICE"].startswith("cuda")
    assert "TAG2MASK_BATCH_SIZE" in _env(services["worker"])


def test_dashboard_service_runs_tag2mask_dashboard_on_the_redis(compose):
    """The rq-dashboard service: ``tag2mask dashboard`` (its options parse) on the compose Redis, its
    port published, env names the code reads, and the image installs the ``dashboard`` extra."""
    from backend.cli.main import build_parser

    dash = compose["services"]["dashboard"]
    cmd = dash["command"]
    assert cmd[:4] == ["python", "-m", "backend.cli", "dashboard"]
    args = build_parser().parse_args(cmd[3:])
    assert args.host == "0.0.0.0" and args.port in _container_ports(dash)
    env = _env(dash)
    assert not set(env) - env_names_read_by_code() - FOREIGN_ENV
    redis_url = urlparse(env["REDIS_URL"])
    assert redis_url.hostname == "redis" and dash["depends_on"]["redis"]["condition"] == "service_healthy"
    assert str(args.port) in " ".join(dash["healthcheck"]["test"])
    assert '".[dashboard]"' in DOCKERFILE.read_text()


def test_dockerfile_build_args(compose):
    text = DOCKERFILE.read_text()
    declared = set(re.findall(r"^ARG\s+([A-Z_][A-Z0-9_]*)", text, flags=re.M))
    assert re.search(r"^FROM\s+\$\{BASE_IMAGE\}", text, flags=re.M)
    for name in APP_SERVICES:
        build = compose["services"][name]["build"]
        assert (REPO / "docker" / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert set(build.get("args", {})) <= declared
    assert "cuda" in compose["services"]["worker"]["build"]["args"]["BASE_IMAGE"]
    assert "cuda" not in compose["services"]["backend"]["build"]["args"]["BASE_IMAGE"]
    # what the image copies exists, and its default command is the web server on $PORT (read by backend.serve)
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for item in shlex.split(src):
            if item != "README.md":        # written by the README task; needed by `pip install .`
                assert (REPO / item).exists(), f"Dockerfile copies missing {item}"
    assert "backend.serve" in text and "PORT" in env_names_read_by_code()
