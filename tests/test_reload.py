"""Config reload without a restart: SIGHUP and `edge reload`, valid and invalid configs."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from helpers import app_entry, eventually, run_edge_cli, to_toml
from stack import CONTROL_PLANE_TOKEN, sample_app_spec

from edge.server.config import load_config_text, restart_keys


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


def edge_code_runs(pid: int) -> bool:
    """The process is past the interpreter's start: it has loaded msgspec (config.py does)."""
    try:
        return "msgspec" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return True  # gone: the caller sees it exit


async def test_sighup_during_start_neither_kills_the_edge_nor_a_worker(
    start_edge, upstream, client, fresh_redis
) -> None:
    """SIGHUPs every 50 ms from the moment the edge's own code runs until well after ready:
    the main process and both workers live on (no worker restarted), and the config they
    announce applies. (The interpreter's own start, before any edge code, is not covered.)"""
    launch = asyncio.create_task(
        asyncio.to_thread(start_edge, edge={"store": fresh_redis}, workers=2)
    )
    for _ in range(100):  # the launcher lists the process right after Popen
        if start_edge.started:
            break
        await asyncio.sleep(0.01)
    edge = start_edge.started[-1]
    config = dict(edge.config)
    config["apps"] = [*config["apps"], app_entry("fresh", ["new.localhost"], upstream)]
    edge.config_path.write_text(to_toml(config))
    await eventually(
        lambda: edge_code_runs(edge.proc.pid), timeout=10, interval=0.01, what="edge code"
    )
    hups = 0
    while not launch.done() or hups < 40:
        if edge.proc.poll() is not None:
            break
        os.kill(edge.proc.pid, signal.SIGHUP)
        hups += 1
        await asyncio.sleep(0.05)
    await launch  # fails the test if the edge exited before it was ready
    assert edge.proc.poll() is None, edge.output()

    async def routed_everywhere() -> bool:
        statuses = await asyncio.gather(
            *(_status_for(client, edge, "new.localhost") for _ in range(8))
        )
        return statuses == [200] * 8

    await eventually(routed_everywhere, timeout=10, what="the new app on every worker")
    assert "restarting" not in edge.output(), edge.output()
    assert edge.proc.poll() is None


async def test_reload_adding_the_first_scale_to_zero_app_wakes_it(
    start_edge, start_control_plane, client
) -> None:
    """The edge started with a control plane but only static apps; a reload adds a
    scale-to-zero app: its first request is held, woken and answered."""
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = start_edge(
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
    config = dict(edge.config)
    shop = {
        "name": "shop",
        "hosts": ["shop.localhost"],
        "scale_to_zero": True,
        "hold_timeout": "15s",
        "readiness_timeout": "10s",
    }
    config["apps"] = [*config["apps"], shop]
    edge.config_path.write_text(to_toml(config))
    edge.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "config reloaded" in edge.output(), timeout=10, what="reload")
    assert await _status_for(client, edge, "shop.localhost") == 200, edge.output()
    assert await _status_for(client, edge, "app.localhost") == 200


BASE = """
[edge]
store = "redis://127.0.0.1:6379/0"

[control_plane]
url = "http://127.0.0.1:7000"

[[apps]]
name = "shop"
hosts = ["shop.localhost"]
scale_to_zero = true
"""


def test_restart_keys_names_the_settings_read_only_at_start() -> None:
    running = load_config_text(BASE)
    live = BASE.replace(
        "scale_to_zero = true",
        'scale_to_zero = true\nidle_timeout = "1m"\nmax_concurrency = 4\nrelease_ramp = true',
    )
    live += '\n[budget]\nmax_concurrent_wakes = 3\n[log]\nlevel = "debug"\n'
    assert restart_keys(running, load_config_text(live)) == []
    changed = (
        BASE.replace("6379/0", "6379/1")
        .replace("7000", "7001")
        .replace("[edge]", '[edge]\nadmin_token = "t0ken"\naccess_log = "-"')
    )
    changed += '\n[budget]\nwake_lease_ttl = "20s"\n'
    changed += "[upstream]\nmax_connections_per_upstream = 8\n"
    assert restart_keys(running, load_config_text(changed)) == [
        "edge.admin_token",
        "edge.store",
        "edge.access_log",
        "control_plane.url",
        "budget.wake_lease_ttl",
        "upstream.max_connections_per_upstream",
    ]


async def test_reload_of_settings_read_at_start_is_refused_and_says_which(
    start_edge, start_control_plane, upstream, client
) -> None:
    """Adding a control plane needs a restart: `edge reload` and SIGHUP refuse the whole
    reload and name the keys; the running config stays (the new app is not routed)."""
    cp = start_control_plane(apps=[sample_app_spec("shop")])
    edge = start_edge(edge={"admin_token": "s3cret"})
    config = dict(edge.config)
    config["control_plane"] = {"url": cp.url}
    config["apps"] = [*config["apps"], app_entry("later", ["later.localhost"], upstream)]
    edge.config_path.write_text(to_toml(config))
    result = run_edge_cli("reload", "--config", str(edge.config_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "control_plane.url" in result.stderr and "restart" in result.stderr, result.stderr
    edge.proc.send_signal(signal.SIGHUP)
    await eventually(
        lambda: "need a restart: control_plane.url" in edge.output(), timeout=10, what="refusal"
    )
    assert await _status_for(client, edge, "later.localhost") == 404
    assert await _status_for(client, edge, "app.localhost") == 200
    assert edge.proc.poll() is None
