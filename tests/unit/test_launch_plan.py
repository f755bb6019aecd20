"""The plan of a local run: which processes, in which order, with which arguments."""

from __future__ import annotations

from pathlib import Path

from agentrl.config import RunConfig, load_config
from agentrl.launch.local import resolve
from agentrl.launch.plan import plan_actors
from agentrl.launch.summary import summary_lines
from agentrl.launch.supervisor import ReadyCheck


def no_check(url: str) -> ReadyCheck:
    async def check() -> bool:
        return True

    return check


def test_plan_orders_steps_engines_envd_workers_controller_learner(tmp_path: Path) -> None:
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
    specs = plan_actors(cfg, tmp_path / "c.yaml", "nats://x:1", ports, no_check)
    names = [s.name for s in specs]
    assert names == ["step-init", "engine-0", "engine-1", "envd-0", "worker-0", "worker-1", "worker-2",
                     "controller", "learner"]
    assert specs[0].step and specs[0].argv[1:4] == ["-m", "agentrl.cli", "model"]
    assert specs[0].argv[-1] == f"{tmp_path}/demo/base"
    assert specs[1].ready is not None and "--port" in specs[1].argv
    assert specs[-1].finishes_run and specs[-1].argv[-4:-2] == ["--nats", "nats://x:1"]


def test_no_engines_uses_configured_urls_and_no_envd_without_remote_envs(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, ["launch.engines=0", "engine.client.urls=[http://gpu:30000]"])
    cfg, ports = resolve(cfg)
    assert ports == [] and cfg.controller.engines == ["http://gpu:30000"]
    names = [s.name for s in plan_actors(cfg, tmp_path / "c.yaml", "nats://x:1", ports, no_check)]
    assert names == ["worker-0", "controller", "learner"]


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
