"""docker/compose.yaml without containers: every service's command is a valid agentrl invocation against the
config it names, the services together make the quickstart's whole run, and the bus they start serves actors
that only have their own credentials.

Each agentrl command is parsed by the real CLI and resolved with ``--print-config`` (as the container would
resolve it, from the repository root, its working directory); the one-shot services must be the quickstart's
own steps (configs/quickstart.yaml) filled in for the shared volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from agentrl.bus import Bus
from agentrl.cli import build_parser, main
from agentrl.config import NatsConfig, load_config
from agentrl.config.run import RunConfig
from agentrl.launch.plan import bus_users

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yaml"
CONFIG = "docker/quickstart.yaml"
RUN_DIR = "/runs/quickstart"
ACTOR_COMMANDS = {"nats", "engine", "envd", "worker", "controller", "learner"}
ADMIN_KEY = "AGENTRL_ENGINE_ADMIN_KEY"


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def resolved(argv: list[str]) -> dict[str, Any]:
    """The config an agentrl command resolves (``--print-config``), run in this process from the repo root."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code: object = main([*argv[1:], "--print-config"])
        except SystemExit as done:  # --print-config exits 0 once it printed; argparse exits 2 on a bad flag
            code = done.code
    assert code == 0, f"{' '.join(argv)}: exit {code} (its error is on stderr)"
    config: dict[str, Any] = yaml.safe_load(out.getvalue())
    return config


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def credentials(argv: list[str]) -> str | None:
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    files = [s.split("=", 1)[1] for s in sets if s.startswith("nats.credentials=")]
    return files[-1] if files else None


def quickstart_steps() -> dict[str, list[str]]:
    """configs/quickstart.yaml's steps as the compose file must run them: on the volume, with its config."""
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    fill = {"{python}": "python", "{run_dir}": RUN_DIR, "{seed}": "0", "{config}": CONFIG}
    steps = {}
    for step in raw["launch"]["steps"]:
        steps[step["name"]] = [re.sub(r"\{\w+\}", lambda m: fill[m.group(0)], a) for a in step["argv"]]
    return steps


@pytest.fixture(autouse=True)
def from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the containers' working directory (/opt/agentrl)


def test_every_agentrl_command_parses_and_resolves_the_config_it_names() -> None:
    parser = build_parser()
    for name, service in services().items():
        argv = service["command"]
        if argv[0] != "agentrl":
            continue
        args = parser.parse_args(argv[1:])  # a bad flag or value is a SystemExit naming it
        if argv[1] == "model":
            continue  # model init takes no config
        assert flag(argv, "--config") == CONFIG, name
        if argv[1] == "nats":  # no --print-config: its config is the one whose users it makes
            assert args.secure and args.host == "0.0.0.0" and args.store_dir == f"{RUN_DIR}/nats", argv
            load_config(RunConfig, args.config, args.overrides)
            continue
        cfg = resolved(argv)
        assert cfg["name"] == "quickstart" and cfg["dir"] == "/runs/{name}", name
        assert cfg["nats"]["credentials"] == credentials(argv), name


def test_a_bad_command_fails_the_check() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--config", CONFIG, "--concurrency", "many"])
    with pytest.raises(AssertionError, match="exit 1"):
        resolved(["agentrl", "learner", "--config", CONFIG, "--set", "training.max_steps=-1"])


def test_the_services_make_the_whole_quickstart_run() -> None:
    found = services()
    commands = {s["command"][1]: name for name, s in found.items() if s["command"][0] == "agentrl"}
    assert set(commands) >= ACTOR_COMMANDS, f"missing actors: {ACTOR_COMMANDS - set(commands)}"
    cfg = load_config(RunConfig, REPO / CONFIG)
    users = set(bus_users(cfg)) - {"launcher", "inspector"}
    given = {credentials(s["command"]) for s in found.values()} - {None}
    assert given == {f"{RUN_DIR}/secrets/{u}.json" for u in users}, "each actor must use its own bus user"
    nats = found[commands["nats"]]["command"]
    assert cfg.nats.url == f"nats://{commands['nats']}:{flag(nats, '--port')}"
    engine = f"http://{commands['engine']}:{cfg.engine.port}"
    assert cfg.engine.host == "0.0.0.0" and cfg.engine.client.urls == [engine] and cfg.controller.engines == [engine]
    assert cfg.worker.remote_envs == list(cfg.envd.envs) and cfg.launch.envd == 1
    assert "--exit-when-done" in found[commands["controller"]]["command"]


def test_the_one_shot_services_are_the_quickstarts_steps_and_run_first() -> None:
    found = services()
    steps = quickstart_steps()
    assert found["data"]["command"] == steps["data"]
    assert found["model"]["command"] == steps["model"]
    assert found["sft"]["command"] == steps["sft"]
    for actor in ("engine", "learner"):
        assert found[actor]["depends_on"]["sft"] == {"condition": "service_completed_successfully"}, actor
    assert set(found["sft"]["depends_on"]) == {"data", "model"}
    for actor in ("engine", "envd", "learner"):
        assert found[actor]["depends_on"]["nats"] == {"condition": "service_healthy"}, actor
    for actor in ("worker", "controller"):
        assert found[actor]["depends_on"]["engine"] == {"condition": "service_healthy"}, actor


def test_engine_admin_key_reaches_the_engine_and_its_callers() -> None:
    found = services()
    for name in ("engine", "worker", "controller"):
        assert ADMIN_KEY in found[name]["environment"], name
    assert ADMIN_KEY not in found["learner"]["environment"]


def test_compose_config_trains_exactly_as_the_quickstart() -> None:
    ours = msgspec.to_builtins(load_config(RunConfig, REPO / CONFIG))
    quick = msgspec.to_builtins(load_config(RunConfig, REPO / "configs" / "quickstart.yaml", ["dir=/runs/{name}"]))
    placement = {"nats", "launch", "engine", "worker", "envd", "controller"}
    for key in set(quick) - placement:
        assert ours[key] == quick[key], key
    for section, where in (("engine", {"host", "client"}), ("worker", {"envs", "remote_envs"}),
                           ("controller", {"engines"})):
        for key in set(quick[section]) - where:
            assert ours[section][key] == quick[section][key], f"{section}.{key}"
    assert ours["nats"]["ack_wait_s"] == quick["nats"]["ack_wait_s"]
    assert ours["envd"]["envs"] == quick["worker"]["envs"], "the env worker serves the quickstart's calculator"


def test_the_nats_service_serves_actors_that_have_only_their_own_credentials(tmp_path: Path) -> None:
    """The nats service's command (on loopback and a free port, the run directory in tmp_path) creates the run's
    streams, so an actor whose user may not create them joins the run."""
    argv = list(services()["nats"]["command"])
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", "0"
    argv[argv.index("--store-dir") + 1] = str(tmp_path / "nats")
    proc = subprocess.Popen([sys.executable, "-m", "agentrl.cli", *argv[1:], "--set", f"dir={tmp_path}/{{name}}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert " at " in ready, ready + proc.stdout.read()
        url = ready.split(" at ", 1)[1].split()[0]
        asyncio.run(_join_as(url, tmp_path / "quickstart" / "secrets" / "controller.json"))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


async def _join_as(url: str, creds: Path) -> None:
    config = NatsConfig(credentials=str(creds), connect_attempts=2)
    async with await Bus.connect(url, "quickstart", config) as bus:  # verifies the run's streams and buckets
        assert await bus.get_version() == 0
