"""docker-compose.yml declares the services the README promises, with commands that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_their_essentials():
    services = compose()["services"]
    assert {"redis", "minio", "minio-setup", "worker-gpu", "worker-io"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "healthcheck" in services["redis"]
    assert "mc mb" in services["minio-setup"]["command"][0]
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any("model-cache" in v for v in gpu["volumes"])
    assert gpu["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert (ROOT / ".env.example").is_file()


def test_service_commands_are_real_cli_commands():
    for name in ("worker-gpu", "worker-io"):
        cmd = compose()["services"][name]["command"]
        assert cmd[:2] == ["dreambatch", "worker"]
        args = [a.replace("${DREAMBATCH_MODEL:-i1-fast}", "i1-fast") for a in cmd[2:]]
        res = subprocess.run([sys.executable, "-m", "worker", "worker", *args, "--help"], capture_output=True,
                             text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "--model" in res.stdout and "--io" in res.stdout


def test_api_service_runs_the_api_command():
    cmd = compose()["services"]["api"]["command"]
    assert cmd[:2] == ["dreambatch", "api"]
    res = subprocess.run([sys.executable, "-m", "worker", *cmd[1:], "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "--host" in res.stdout and "--port" in res.stdout
