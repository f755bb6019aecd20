"""Config loading: YAML + --set overrides, errors that name key, value and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentrl.config import RunConfig, dump_config, load_config, parse_override
from agentrl.errors import ConfigError


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\nnats:\n  max_deliver: 3\n")
    cfg = load_config(RunConfig, path, ["nats.ack_wait_s=1e-1", "seed=7"])
    assert (cfg.name, cfg.nats.max_deliver, cfg.nats.ack_wait_s, cfg.seed) == ("demo", 3, 0.1, 7)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, ["name=x", "nats.url=nats://h:1"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(RunConfig, out) == cfg
    assert yaml.safe_load(out.read_text())["nats"]["url"] == "nats://h:1"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nats.max_delivr=3", r"config key nats.max_delivr: unknown key"),
        ("nats.max_deliver=0", r"config key nats.max_deliver: got 0; expected `int` >= 1"),
        ("nats.max_deliver=lots", r"config key nats.max_deliver: got 'lots'; expected `int`, got `str`"),
        ("name=has space", r"config key name: got 'has space'"),
        ("nats=3", r"config key nats: got 3"),
        ("seed", r"expected KEY=VALUE"),
        ("nats.url.x=1", r"config key nats.url: got \{.x.: 1\}; expected `str \| null`"),
    ],
)
def test_bad_values_name_key_value_and_expectation(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RunConfig, bad)


def test_override_values_are_yaml_typed() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=1e-5") == (["a"], 1e-5)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=") == (["a"], "")


def test_run_dir_placeholder_is_filled_everywhere() -> None:
    cfg = load_config(RunConfig, None, [
        "name=q", "dir=/r/{name}", "engine.model={run_dir}/sft",
        "launch.steps=[{name: a, argv: [x, '{run_dir}/b', '{config}']}]",
    ])
    assert cfg.engine.model == "/r/q/sft" and cfg.learner.weights_dir == "/r/q/weights"
    assert cfg.launch.steps[0].argv == ["x", "/r/q/b", "{config}"]
    assert cfg.dir == "/r/{name}"


def test_the_training_contract_is_one_section_and_the_old_keys_are_gone() -> None:
    cfg = load_config(RunConfig, None, ["training.batch_size=32", "training.group_size=8", "training.max_steps=5"])
    assert (cfg.training.batch_size, cfg.training.max_staleness, cfg.training.stale_policy) == (32, 1, "mask")
    with pytest.raises(ConfigError, match=r"training.batch_size=30 must be a multiple of training.group_size=8"):
        load_config(RunConfig, None, ["training.batch_size=30"])
    for old in ("controller.batch_size=32", "controller.max_staleness=1", "learner.batch.trajectories_per_step=8",
                "learner.batch.max_staleness=1", "learner.max_steps=3", "controller.dynamic_sampling=true"):
        with pytest.raises(ConfigError, match=rf"config key {old.split('=')[0]}: unknown key"):
            load_config(RunConfig, None, [old])
