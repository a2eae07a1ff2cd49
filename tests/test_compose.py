"""docker-compose.yml, checked the way `docker compose config` would and against dreambatch itself, without a
Docker engine (none runs here): the YAML parses with its anchors; every service it names, depends on, mounts and
interpolates exists; every variable in .env.example is a real setting (or one compose itself reads); the
host-side addresses in .env.example are the ports compose publishes; every service command is a real CLI command
with real options; the buckets the example schedules use are the ones minio-setup creates; the GPU worker's
weights come from a mounted host cache that `dreambatch models download` fills.

What this does not prove (it needs an engine, a GPU and the network): that the image builds, that the nvidia
device reservation starts, that compose expands `~` in the cache mount as documented, that MinIO's and Redis's
healthchecks pass in their images, and an end-to-end job through the containers."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from jobs.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DREAMBATCH = ("worker-gpu", "worker-io", "beat", "api")  # the services that run the dreambatch image
BOTO = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"}
HUB = {"HF_HUB_OFFLINE"}  # huggingface_hub's own
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")
CONTAINER_VARIABLE = re.compile(r"\$\$\{([A-Z0-9_]+)")  # `$${X}`: the container's shell reads X (from env_file)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    return dotenv_values(ROOT / ".env.example")


def interpolated() -> dict[str, str | None]:
    """Every ${VAR} / ${VAR:-default} compose substitutes (a `$$` is the container's own, not compose's)."""
    return {m.group(1): m.group(2) for m in INTERPOLATION.finditer((ROOT / "docker-compose.yml").read_text())}


def is_setting(name: str) -> bool:
    """Whether DREAMBATCH_A__B names a field of Settings (nested with __), as pydantic-settings would read it."""
    if not name.startswith("DREAMBATCH_"):
        return False
    model: type = Settings
    for part in name.removeprefix("DREAMBATCH_").lower().split("__"):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_services_and_their_essentials():
    services = compose()["services"]
    assert {"redis", "minio", "minio-setup", *DREAMBATCH} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "healthcheck" in services["redis"]
    assert "mc mb" in services["minio-setup"]["command"][0]
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert (ROOT / ".env.example").is_file()


def test_every_reference_resolves_depends_on_volumes_and_healthchecks():
    doc = compose()
    services, named = doc["services"], set(doc.get("volumes") or {})
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, volume)
            elif not source.startswith(("/", "~", "${")):
                assert source in named, f"{name} mounts volume {source!r}, which volumes: does not declare"
        if service.get("env_file"):
            assert service["env_file"] == ".env"  # what `cp .env.example .env` makes


def test_every_variable_is_a_setting_or_one_compose_or_boto3_reads():
    env, used = env_example(), interpolated()
    in_containers = set(CONTAINER_VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))
    for name in env:
        assert is_setting(name) or name in BOTO or name in used or name in in_containers, (
            f".env.example sets {name}, which no setting, boto3 or docker-compose.yml reads"
        )
    for name, default in used.items():
        assert name in env or default is not None, f"docker-compose.yml needs {name}: .env.example or a default"
    for name in DREAMBATCH:
        for var in compose()["services"][name].get("environment") or {}:
            assert is_setting(var) or var in BOTO or var in HUB, (name, var)
    # .env.example is a valid configuration, read as the host CLI reads it (get_settings: the file's values)
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.output == f"s3://{env['DREAMBATCH_BUCKET']}/outputs"
    assert settings.s3.public_endpoint_url == env["AWS_ENDPOINT_URL_S3"]


def test_host_addresses_are_the_published_ports_and_services_reach_each_other_by_name():
    services, env = compose()["services"], env_example()

    def published(service: str) -> set[str]:
        return {p.rsplit(":", 1)[0] for p in services[service]["ports"]}  # "127.0.0.1:6379"

    redis, s3 = urlsplit(env["DREAMBATCH_REDIS_URL"]), urlsplit(env["AWS_ENDPOINT_URL_S3"])
    assert f"{redis.hostname}:{redis.port}" in published("redis")
    assert f"{s3.hostname}:{s3.port}" in published("minio")
    assert urlsplit(env["DREAMBATCH_S3__PUBLIC_ENDPOINT_URL"]).netloc in published("minio")
    for name in DREAMBATCH:
        environment = services[name]["environment"]
        assert urlsplit(environment["DREAMBATCH_REDIS_URL"]).hostname in services
        assert urlsplit(environment["AWS_ENDPOINT_URL_S3"]).hostname in services


def test_the_buckets_anything_writes_to_are_the_ones_minio_setup_creates():
    setup = compose()["services"]["minio-setup"]["command"][0]
    created = {
        m.replace("$${DREAMBATCH_BUCKET:-dreambatch}", env_example()["DREAMBATCH_BUCKET"])
        for m in re.findall(r"local/(\S+)", setup.split("mc mb", 1)[1])
    }
    assert env_example()["DREAMBATCH_OUTPUT"].removeprefix("s3://").split("/")[0] in created
    schedules = tomllib.loads((ROOT / "ops" / "schedules.toml").read_text())["schedules"]
    for name, schedule in schedules.items():  # beat fires them: their buckets must exist
        for location in (schedule["output"], schedule.get("source", {}).get("prefix") or "s3://x"):
            bucket = location.removeprefix("s3://").split("/")[0]
            assert bucket == "x" or bucket in created, (
                f"schedule {name} uses bucket {bucket!r}; minio-setup creates {sorted(created)}"
            )


def test_the_gpu_worker_reads_weights_from_a_mounted_host_cache():
    gpu = compose()["services"]["worker-gpu"]
    assert gpu["environment"]["HF_HUB_OFFLINE"] == "1"  # workers never download…
    [mount] = [v for v in gpu["volumes"] if v.endswith(":/root/.cache/huggingface")]
    assert mount.startswith("${DREAMBATCH_MODEL_CACHE")  # …the host's cache, which `models download` fills
    assert "dreambatch models download" in (ROOT / "docker-compose.yml").read_text()
    assert "dreambatch models download" in (ROOT / "README.md").read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DREAMBATCH_ENV_FILE": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


@pytest.mark.parametrize("name", DREAMBATCH)
def test_service_commands_are_real_cli_commands_with_real_options(name):
    cmd = compose()["services"][name]["command"]
    assert cmd[0] == "dreambatch"
    args = [INTERPOLATION.sub(lambda m: env_example().get(m.group(1)) or m.group(2) or "", a) for a in cmd[1:]]
    res = _cli(*args, "--help")  # an unknown option before --help is an error: the options are checked too
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout


def test_the_api_healthcheck_asks_a_route_the_api_serves():
    pytest.importorskip("fastapi")
    from jobs.api.app import create_app

    check = " ".join(compose()["services"]["api"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1:8000(/\w+)", check).group(1)
    paths = {getattr(r, "path", None) for r in create_app(Settings(output="s3://b/p")).routes}
    assert path in paths and "--port 8000" in " ".join(compose()["services"]["api"]["command"])


def test_the_image_runs_from_app_where_ops_is_mounted():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile
    for name in ("worker-io", "beat"):
        assert "./ops:/app/ops:ro" in compose()["services"][name]["volumes"]
    assert Settings().catalog.schedules_file.startswith("ops/")  # relative to the cwd: /app
