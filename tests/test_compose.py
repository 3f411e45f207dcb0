"""docker-compose.yml, read as data: what `docker compose up` would run.

No Docker engine is needed: the file is parsed and its properties checked
(scripts/check_release.sh also runs ``docker compose config`` where the CLI
plugin is installed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> Dict[str, Dict[str, Any]]:
    data = yaml.safe_load(COMPOSE.read_text())
    out: Dict[str, Dict[str, Any]] = data["services"]
    return out


def test_every_service_has_a_healthcheck(services: Dict[str, Dict[str, Any]]) -> None:
    missing = [name for name, svc in services.items() if not svc.get("healthcheck", {}).get("test")]
    assert missing == []


def test_every_published_host_port_is_overridable_by_a_variable(services: Dict[str, Dict[str, Any]]) -> None:
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert published, "the default services publish their ports"
    for name, ports in published.items():
        for port in ports:
            assert re.fullmatch(r"127\.0\.0\.1:\$\{MCP_REDIS_[A-Z_]+_PORT:-\d+\}:\d+", str(port)), (name, port)


def test_postgres_accepts_the_passwordless_login_the_tests_and_demo_use(services: Dict[str, Dict[str, Any]]) -> None:
    from mcp_redis.testing import DEFAULT_ADMIN_DSN

    assert "password" not in DEFAULT_ADMIN_DSN and "user=postgres" in DEFAULT_ADMIN_DSN
    env = services["postgres"]["environment"]
    assert env.get("POSTGRES_HOST_AUTH_METHOD") == "trust"
    assert "POSTGRES_PASSWORD" not in env
    assert all(str(p).startswith("127.0.0.1:") for p in services["postgres"]["ports"])


def test_each_sentinel_keeps_its_rewritten_config_on_its_own_volume(services: Dict[str, Dict[str, Any]]) -> None:
    sentinels = {name: svc for name, svc in services.items() if "--sentinel" in " ".join(map(str, svc.get("command", [])))}
    assert len(sentinels) == 3
    mounts = set()
    for name, svc in sentinels.items():
        script = " ".join(map(str, svc["command"]))
        conf = re.search(r"redis-server (\S+) --sentinel", script)
        assert conf, name
        volume, _, target = svc["volumes"][0].partition(":")
        assert conf.group(1).startswith(target.rstrip("/") + "/"), (name, conf.group(1), target)
        # The initial config is written only when the volume has none.
        assert f"[ ! -s {conf.group(1)} ]" in script, name
        mounts.add(volume)
    assert len(mounts) == 3, "one volume per Sentinel"
    assert mounts <= set(yaml.safe_load(COMPOSE.read_text())["volumes"])


def test_host_networking_is_documented_as_linux_only(services: Dict[str, Dict[str, Any]]) -> None:
    host = [name for name, svc in services.items() if svc.get("network_mode") == "host"]
    assert host, "the sentinel and cluster profiles use host networking"
    assert all(services[name].get("profiles") for name in host), "the default services need no host networking"
    readme = (ROOT / "README.md").read_text()
    assert "network_mode: host" in readme and "Linux only" in readme
    assert "Linux only" in COMPOSE.read_text()


def test_postgres_availability_check_says_why_instead_of_swallowing_the_error() -> None:
    """With the wrong credentials the tests and the demo report the server's reason (no password echoed)."""
    from mcp_redis.testing import PostgresDatabase, free_port

    db = PostgresDatabase("host=127.0.0.1 port=5432 user=mcp_redis_no_such_role password=s3cret-value "
                          "dbname=postgres connect_timeout=3")
    if PostgresDatabase().available():
        assert db.available() is False
        assert 'role "mcp_redis_no_such_role" does not exist' in db.error
    refused = PostgresDatabase(f"host=127.0.0.1 port={free_port()} user=postgres password=s3cret-value "
                               "dbname=postgres connect_timeout=3")
    assert refused.available() is False
    assert "Connection refused" in refused.error
    assert "s3cret-value" not in db.error + refused.error
