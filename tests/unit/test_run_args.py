"""``agentrl run`` takes its config as ``CONFIG`` or, like every actor, as ``--config CONFIG``."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from agentrl import cli

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
