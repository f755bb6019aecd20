"""A JetStream cluster's pure parts: one node's cluster block, server URL lists, auto replicas, shared secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentrl.bus.client import auto_replicas, credential_options, server_urls
from agentrl.bus.server import ClusterSpec, render_cluster, render_config
from agentrl.config import RunConfig, load_config
from agentrl.errors import ConfigError
from agentrl.launch.prepare import route_password, shared_credentials


def test_a_cluster_node_config_names_the_server_listens_for_routes_and_seeds_them(tmp_path: Path) -> None:
    spec = ClusterSpec("c1", "n1", 6222, ("nats-route://10.0.0.2:6222", "10.0.0.3:6222"))
    text = render_config(4222, tmp_path / "js", 8, "10.0.0.1", cluster=spec)
    assert "server_name: n1" in text and "name: c1" in text and "listen: 10.0.0.1:6222" in text
    assert 'routes: ["nats-route://10.0.0.2:6222", "nats-route://10.0.0.3:6222"]' in text
    assert "authorization" not in text
    assert "cluster {" not in render_config(4222, tmp_path / "js", 8)


def test_route_authorization_is_required_and_sent_on_every_route() -> None:
    spec = ClusterSpec("c1", "n2", 7000, ("h1:7000",), host="0.0.0.0", user="route", password="p/w@x")
    text = render_cluster(spec, "127.0.0.1")
    assert "listen: 0.0.0.0:7000" in text
    assert 'user: "route"' in text and 'password: "p/w@x"' in text
    assert '"nats-route://route:p%2Fw%40x@h1:7000"' in text  # the password is URL-quoted in the route


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "a b"}, "cluster name"),
    ({"server_name": ""}, "server name"),
    ({"port": 0}, "cluster port"),
    ({"routes": ("nats://h:1",)}, "route"),
    ({"routes": ("h",)}, "route"),
    ({"routes": ("h:notaport",)}, "route"),
    ({"user": "u"}, "both a user and a password"),
])
def test_bad_cluster_settings_are_refused_by_name(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"name": "c", "server_name": "n", "port": 6222}
    with pytest.raises(ConfigError, match=match):
        ClusterSpec(**{**base, **kwargs})  # type: ignore[arg-type]


def test_server_url_lists() -> None:
    assert server_urls("nats://a:1") == ["nats://a:1"]
    assert server_urls("nats://a:1, nats://b:2,nats://c:3") == ["nats://a:1", "nats://b:2", "nats://c:3"]
    with pytest.raises(ConfigError, match="empty entry"):
        server_urls("nats://a:1,,nats://b:2")
    assert credential_options("nats://a:1,nats://u:p@b:2", None) == {"inbox_prefix": "_INBOX.u"}


def test_three_replicas_from_a_cluster_of_three() -> None:
    assert [auto_replicas(n) for n in (1, 2, 3, 5)] == [1, 1, 3, 3]


def test_cluster_nodes_share_one_set_of_users_and_one_route_password(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, None, [f"dir={tmp_path}/{{name}}", "name=c"])
    first = shared_credentials(cfg, tmp_path / "secrets")
    second = shared_credentials(cfg, tmp_path / "secrets")
    assert first == second and {"launcher", "controller", "learner", "engine-0", "worker-0"} <= set(first)
    assert route_password(tmp_path / "secrets") == route_password(tmp_path / "secrets")
    (tmp_path / "secrets" / "learner.json").unlink()  # an incomplete set is made again, whole
    third = shared_credentials(cfg, tmp_path / "secrets")
    assert third["controller"].password != first["controller"].password
