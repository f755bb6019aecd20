"""The plan of a local run: which processes, in which order, with which arguments, credentials and keys."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest

from agentrl.bus.auth import CREDENTIALS_ENV
from agentrl.client.protocol import ADMIN_KEY_ENV
from agentrl.config import RunConfig, load_config
from agentrl.launch.local import resolve
from agentrl.launch.plan import LaunchContext, bus_users, plan_actors
from agentrl.launch.prepare import prepare
from agentrl.launch.summary import summary_lines
from agentrl.launch.supervisor import ReadyCheck

CHECKED: list[str] = []


def record_check(url: str) -> ReadyCheck:
    CHECKED.append(url)

    async def check() -> bool:
        return True

    return check


def context(tmp_path: Path, ports: list[int], **kw: object) -> LaunchContext:
    return LaunchContext(tmp_path / "c.yaml", "nats://x:1", ports, record_check, **kw)  # type: ignore[arg-type]


def test_plan_orders_steps_nats_engines_envd_workers_controller_learner(tmp_path: Path) -> None:
    done = tmp_path / "exists"
    done.touch()
    cfg = load_config(RunConfig, None, [
        f"dir={tmp_path}/{{name}}", "name=demo", "launch.engines=2", "launch.workers=3",
        "envd.envs={calc: envs.calculator:CalculatorEnv}",
        "launch.steps=[{name: init, argv: [agentrl, model, init, '{run_dir}/base']},"
        f" {{name: skipped, argv: [x], skip_if_exists: '{done}'}}]",
    ])
    cfg, ports = resolve(cfg)
    assert len(set(ports)) == 2
    assert cfg.engine.client.urls == cfg.controller.engines == [f"http://127.0.0.1:{p}" for p in ports]
    creds = {name: tmp_path / f"{name}.json" for name in bus_users(cfg)}
    specs = plan_actors(cfg, context(tmp_path, ports, nats_argv=["nats-server", "-c", "x.conf"],
                                     credentials=creds, engine_admin_key="K"))
    by_name = {s.name: s for s in specs}
    assert list(by_name) == ["step-init", "nats", "engine-0", "engine-1", "envd-0", "worker-0", "worker-1",
                             "worker-2", "controller", "learner"]
    assert specs[0].step and specs[0].argv[1:4] == ["-m", "agentrl.cli", "model"]
    assert specs[0].argv[-1] == f"{tmp_path}/demo/base"
    assert by_name["nats"].argv == ["nats-server", "-c", "x.conf"] and by_name["nats"].death_signal == 15
    assert by_name["engine-0"].ready is not None and by_name["engine-0"].health is not None
    assert "--port" in by_name["engine-0"].argv and CHECKED[-2:] == [f"{u}/health" for u in cfg.engine.client.urls]
    assert specs[-1].finishes_run and specs[-1].argv[-4:-2] == ["--nats", "nats://x:1"]
    # every actor on the bus gets its own credentials; only engines and their callers get the admin key
    for name in ("envd-0", "worker-1", "controller", "learner", "engine-1"):
        assert by_name[name].env[CREDENTIALS_ENV] == str(tmp_path / f"{name}.json")
    assert {n for n, s in by_name.items() if s.env.get(ADMIN_KEY_ENV) == "K"} == {
        "engine-0", "engine-1", "worker-0", "worker-1", "worker-2", "controller"}
    assert all(s.hang_timeout_s == 120.0 for n, s in by_name.items() if n.split("-")[0] in
               ("envd", "worker", "controller", "learner"))


def test_no_engines_uses_configured_urls_and_no_envd_without_remote_envs(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, ["launch.engines=0", "engine.client.urls=[http://gpu:30000]"])
    cfg, ports = resolve(cfg)
    assert ports == [] and cfg.controller.engines == ["http://gpu:30000"]
    names = [s.name for s in plan_actors(cfg, context(tmp_path, ports))]
    assert names == ["worker-0", "controller", "learner"]


def test_sglang_engines_are_launched_with_its_flags_and_waited_on_health_generate(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, ["launch.engine=sglang", "engine.model=/models/qwen", "engine.host=0.0.0.0",
                                        "launch.engine_args=[--tp, '2', --mem-fraction-static, '0.8']"])
    cfg, ports = resolve(cfg)
    engine = plan_actors(cfg, context(tmp_path, ports, engine_admin_key="K"))[0]
    assert engine.argv == [sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/qwen", "--host",
                           "0.0.0.0", "--port", str(ports[0]), "--admin-api-key", "K", "--tp", "2",
                           "--mem-fraction-static", "0.8"]
    assert CHECKED[-1] == f"http://0.0.0.0:{ports[0]}/health_generate"


def test_engine_command_fills_its_placeholders(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [
        f"dir={tmp_path}/{{name}}", "launch.engine=command", "engine.model=/m", "launch.engine_health_path=/ready",
        "launch.engine_command=['{python}', serve.py, '{model}', '{host}:{port}', '{run_dir}']",
    ])
    cfg, ports = resolve(cfg)
    engine = plan_actors(cfg, context(tmp_path, ports))[0]
    assert engine.argv == [sys.executable, "serve.py", "/m", f"127.0.0.1:{ports[0]}", f"{tmp_path}/default"]
    assert CHECKED[-1] == f"http://127.0.0.1:{ports[0]}/ready"


def test_prepare_writes_private_credentials_and_a_server_config_with_every_user(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=demo", "launch.workers=2"])
    cfg, ports = resolve(cfg)
    ctx = prepare(cfg, tmp_path / "c.yaml", ports, record_check)
    assert set(ctx.credentials) == {"launcher", "inspector", "engine-0", "worker-0", "worker-1", "controller",
                                    "learner"}
    worker = json.loads(ctx.credentials["worker-1"].read_text())
    assert worker["user"] == "worker-1" and worker["inbox_prefix"] == "_INBOX.worker-1" and len(worker["password"]) > 20
    assert stat.S_IMODE(ctx.credentials["worker-1"].stat().st_mode) == 0o600
    assert stat.S_IMODE(ctx.credentials["worker-1"].parent.stat().st_mode) == 0o700
    conf = Path(ctx.nats_argv[-1]) if ctx.nats_argv else None
    assert conf is not None and stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert worker["password"] in conf.read_text() and "authorization" in conf.read_text()
    assert ctx.engine_admin_key and len(ctx.engine_admin_key) > 30
    assert (tmp_path / "demo" / "nats" / "url").read_text() == ctx.nats_url
    open_cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=open", "nats.auth=false"])
    ctx = prepare(open_cfg, tmp_path / "c.yaml", [], record_check)
    assert ctx.credentials == {} and ctx.nats_argv and "authorization" not in Path(ctx.nats_argv[-1]).read_text()


def test_a_stopped_run_names_its_last_weights_never_a_final_model(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=demo"])
    run_dir = Path(cfg.run_dir)
    for name in ("final", "last"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "config.json").write_text("{}")
    stopped = summary_lines(cfg, completed=False)
    assert f"last weights (the run was stopped, this is not the final model): {run_dir / 'last'}" in stopped
    assert not any(line.startswith("final model") for line in stopped)
    assert f"final model (Hugging Face checkpoint): {run_dir / 'final'}" in summary_lines(cfg, completed=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_prepare_with_tls_makes_a_ca_the_clients_trust(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=demo", "nats.tls=true"])
    ctx = prepare(cfg, tmp_path / "c.yaml", [], record_check)
    assert ctx.nats_url.startswith("tls://127.0.0.1:")
    ca = json.loads(ctx.credentials["learner"].read_text())["ca_file"]
    assert Path(ca).read_text().startswith("-----BEGIN CERTIFICATE-----")
    conf = Path(ctx.nats_argv[-1]).read_text() if ctx.nats_argv else ""
    assert "tls {" in conf and "server.pem" in conf and "server.key" in conf
