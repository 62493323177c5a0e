"""Config reload without a restart: SIGHUP and `edge reload`, valid and invalid configs."""

from __future__ import annotations

import signal

from helpers import app_entry, eventually, run_edge_cli, to_toml


async def _status_for(client, edge, host: str) -> int:
    async with client.get(edge.url + "/echo", headers={"Host": host}) as resp:
        await resp.read()
        return resp.status


async def test_sighup_applies_new_routes(start_edge, upstream, client) -> None:
    edge = start_edge()
    assert await _status_for(client, edge, "new.localhost") == 404
    config = dict(edge.config)
    config["apps"] = [
        *config["apps"],
        app_entry("fresh", ["new.localhost"], upstream),
    ]
    edge.config_path.write_text(to_toml(config))
    edge.proc.send_signal(signal.SIGHUP)

    async def routed() -> bool:
        return await _status_for(client, edge, "new.localhost") == 200

    await eventually(routed, timeout=10)
    assert await _status_for(client, edge, "app.localhost") == 200
    assert edge.proc.poll() is None


async def test_invalid_reload_keeps_running_config(start_edge, client) -> None:
    edge = start_edge()
    good = edge.config_path.read_text()
    edge.config_path.write_text(good + "\n[limits]\nheader_timeout = 'soon'\n")
    edge.proc.send_signal(signal.SIGHUP)

    async def refused() -> bool:
        return "reload refused" in edge.output()

    await eventually(refused, timeout=10)
    assert edge.proc.poll() is None
    assert await _status_for(client, edge, "app.localhost") == 200


async def test_edge_reload_command(start_edge, upstream, client) -> None:
    edge = start_edge(edge={"admin_token": "s3cret"})
    config = dict(edge.config)
    config["apps"] = [*config["apps"], app_entry("later", ["later.localhost"], upstream)]
    edge.config_path.write_text(to_toml(config))
    result = run_edge_cli("reload", "--config", str(edge.config_path))
    assert result.returncode == 0, result.stderr

    async def routed() -> bool:
        return await _status_for(client, edge, "later.localhost") == 200

    await eventually(routed, timeout=10)

    edge.config_path.write_text(to_toml(config).replace('"later"', '"Bad Name"'))
    refused = run_edge_cli("reload", "--config", str(edge.config_path))
    # The CLI validates locally first: a bad file never reaches the running edge.
    assert refused.returncode == 2
    assert "apps[1].name" in refused.stderr
    assert await _status_for(client, edge, "later.localhost") == 200
