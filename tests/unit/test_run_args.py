"""``agentrl run`` takes its config as ``CONFIG`` or, like every actor, as ``--config CONFIG``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from agentrl import cli
from agentrl.commands.run import move_aside, rerun_notice
from agentrl.config.run import RunConfig
from agentrl.config.training import TrainingConfig

REPO = Path(__file__).resolve().parents[2]


def resolved(argv: list[str]) -> dict[str, object]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(["run", *argv, "--print-config"])
    assert exit_.value.code == 0
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("argv", [["configs/quickstart.yaml"], ["--config", "configs/quickstart.yaml"],
                                  ["-c", "configs/quickstart.yaml"], ["configs/quickstart.yaml", "-c", "configs/quickstart.yaml"]])
def test_config_as_positional_or_option(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert resolved(argv)["name"] == "quickstart"


def test_no_config_or_two_configs_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    assert cli.main(["run"]) == 1
    assert "agentrl run needs a config file" in capsys.readouterr().err
    assert cli.main(["run", "configs/quickstart.yaml", "--config", "configs/kernelgen.yaml"]) == 1
    assert "two config files given" in capsys.readouterr().err


def _old_run(tmp_path: Path, step: int | None) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: demo\n")
    if step is not None:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "LATEST").write_text(f"step_{step:08d}")
    return run_dir


def _cfg(tmp_path: Path, max_steps: int = 10) -> RunConfig:
    return RunConfig(name="demo", dir=str(tmp_path / "runs" / "{name}"), training=TrainingConfig(
        batch_size=8, group_size=8, max_steps=max_steps))


def test_a_rerun_says_it_resumes_or_that_the_run_finished(tmp_path: Path) -> None:
    assert rerun_notice(_cfg(tmp_path)) is None  # nothing there yet
    _old_run(tmp_path, 4)
    assert "resuming it from its checkpoint at step 4" in (rerun_notice(_cfg(tmp_path)) or "")
    assert "--fresh starts over" in (rerun_notice(_cfg(tmp_path)) or "")
    finished = rerun_notice(_cfg(tmp_path, max_steps=4)) or ""
    assert "finished at step 4/4: nothing is left to train" in finished and "--run NAME" in finished


def test_fresh_moves_the_old_run_aside_unless_it_is_in_use(tmp_path: Path) -> None:
    from agentrl.launch.lock import RunDirInUse, run_lock

    run_dir = _old_run(tmp_path, 4)
    with run_lock(run_dir), pytest.raises(RunDirInUse):
        move_aside(run_dir)
    moved = move_aside(run_dir)
    assert not run_dir.exists() and (moved / "checkpoints" / "LATEST").exists()
    assert moved.name.startswith("demo.old-") and rerun_notice(_cfg(tmp_path)) is None
