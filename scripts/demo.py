"""Helpers of scripts/run-local (`make run`): render the demo's configs and its try list,
wait for a process to answer, pick a free port, stop the control plane's app processes.

    python scripts/demo.py render --run-dir DIR --edge-port N ... (see --help)
    python scripts/demo.py summary --run-dir DIR [--started UNIX_TIME]
    python scripts/demo.py port 6390
    python scripts/demo.py wait --pid PID --http URL [--instance NAME] [--timeout S]
    python scripts/demo.py wait --pid PID --redis PORT
    python scripts/demo.py stop-apps --url http://127.0.0.1:9400

Light imports only (it runs several times per start, so it must start fast). The
configs are rendered from the committed templates (configs/local.toml and
configs/controlplane.local.toml) as data: ports, store, workers and idle timeouts are
set here, and nowhere else, so a test can run the demo on free ports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler_client.config_file import render_toml
from scheduler_client.local.loopback import accepts, free_port, redis_pong

ROOT = Path(__file__).resolve().parent.parent
TERMINAL_STATES = ("stopped", "failed")
# The wake controller drains a sleeping app for 5 s (SLEEP_DRAIN_DEADLINE), checks idleness
# once a second, and the app then takes a moment to exit: idle timeout + this = asleep.
SLEEP_SLACK = 10

logger = logging.getLogger("run-local")


def seconds(duration: str) -> float:
    """A config duration ("20s", "500ms", "2m", "1h", or a number of seconds) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", duration)
    if match is None:
        raise ValueError(f"not a duration: {duration!r} (e.g. 20s, 500ms, 2m)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    return float(match.group(1)) * scale


# ---------------------------------------------------------------------- render


PORT_FIELDS = ("edge_port", "admin_port", "control_port", "static_port", "workers")


@dataclass(frozen=True)
class Demo:
    """One run of the demo: where it lives, its ports, its store."""

    run_dir: Path
    caller_dir: Path
    venv: Path
    edge_port: int
    admin_port: int
    control_port: int
    static_port: int
    store: str  # redis://127.0.0.1:PORT/0 or memory://
    store_note: str
    workers: int
    hello_idle: str
    shop_idle: str

    @property
    def queueing(self) -> bool:
        return not self.store.startswith("memory://")

    def shown(self, path: Path) -> str:
        """A path as the user can paste it from where they started the demo."""
        path = path.resolve()
        try:
            return str(path.relative_to(self.caller_dir.resolve()))
        except ValueError:
            return str(path)

    @property
    def edge_config(self) -> Path:
        return self.run_dir / "edge.toml"

    @property
    def controlplane_config(self) -> Path:
        return self.run_dir / "controlplane.toml"

    @property
    def record(self) -> Path:
        return self.run_dir / "shop-webhooks.jsonl"


def _app(apps: list[dict[str, Any]], name: str, template: Path) -> dict[str, Any]:
    for app in apps:
        if app.get("name") == name:
            return app
    raise SystemExit(f"run-local: {template} has no app {name!r}")


def render_edge(demo: Demo, template: Path) -> str:
    """The edge config of this run: the template with this run's ports, store and idles."""
    with open(template, "rb") as f:
        config = tomllib.load(f)
    edge = config.setdefault("edge", {})
    edge.update(
        listen=f"127.0.0.1:{demo.edge_port}",
        admin_listen=f"127.0.0.1:{demo.admin_port}",
        workers=demo.workers,
        store=demo.store,
    )
    config.setdefault("control_plane", {})["url"] = f"http://127.0.0.1:{demo.control_port}"
    apps = config.get("apps", [])
    _app(apps, "hello", template)["idle_timeout"] = demo.hello_idle
    shop = _app(apps, "shop", template)
    shop["idle_timeout"] = demo.shop_idle
    if not demo.queueing:
        # memory:// cannot queue (the config refuses it): webhooks get the default, 503.
        shop["rules"] = [rule for rule in shop.get("rules", []) if rule.get("class") != "queue"]
        shop.pop("replay", None)
    _app(apps, "static", template)["upstreams"] = [f"127.0.0.1:{demo.static_port}"]
    return render_toml(config, f"Rendered by scripts/run-local from {template}; edit that instead.")


def _absolute(value: str, base: Path) -> str:
    """A relative path in the template (relative to its folder) made absolute."""
    if value.startswith(("./", "../")):
        return str((base / value).resolve())
    return value


def render_controlplane(demo: Demo, template: Path) -> str:
    """The control plane's config of this run; it runs in the run folder, so paths the
    template gives relative to its own folder are made absolute."""
    with open(template, "rb") as f:
        config = tomllib.load(f)
    base = template.resolve().parent
    section = config.setdefault("controlplane", {})
    section.update(
        listen=f"127.0.0.1:{demo.control_port}",
        state_file=str(demo.run_dir / "controlplane.sqlite"),
    )
    for app in config.get("apps", []):
        app["command"] = [_absolute(part, base) for part in app["command"]]
        app["artifact"] = _absolute(app["artifact"], base)
    shop = _app(config.get("apps", []), "shop", template)
    # Every shop instance appends its webhook deliveries here; GET /webhooks lists them.
    shop["command"] = [*shop["command"], "--record", str(demo.record)]
    return render_toml(config, f"Rendered by scripts/run-local from {template}; edit that instead.")


def try_list(demo: Demo) -> list[tuple[str, str]]:
    """The walk-through: (command, what it should show), in the order to run them."""
    edge = f"http://127.0.0.1:{demo.edge_port}"
    timed = "curl -si -w 'took %{time_total}s\\n'"
    hello = f"{timed} -H 'Host: hello.localhost' {edge}/"
    webhook = (
        "curl -si -H 'Host: shop.localhost' -H 'Stripe-Event-Id: evt_demo_1' "
        f"""-d '{{"type": "payment_intent.succeeded"}}' {edge}/webhooks/stripe"""
    )
    checkout = f"curl -si -H 'Host: shop.localhost' -d 'item=book' {edge}/checkout"
    edge_cli = demo.shown(demo.venv / "bin" / "edge")
    status = f"{edge_cli} status --config {demo.shown(demo.edge_config)}"
    nap = round(max(seconds(demo.hello_idle), seconds(demo.shop_idle))) + SLEEP_SLACK
    lines = [
        (
            hello,
            "200 after ~1-2 s: hello was asleep, the edge held the request while it woke it; "
            "Server-Timing: wake phases",
        ),
        (hello, "200 in milliseconds, no Server-Timing: hello is hot now"),
    ]
    if demo.queueing:
        lines += [
            (
                f"for n in 1 2; do {webhook}; echo; done",
                'shop is asleep: 202 {"queued_id": ..., "duplicate": false}: queued in Redis, '
                'shop woken; the same event id again: 202 {"queued_id": <the same>, '
                '"duplicate": true}: not queued twice',
            ),
            (
                f"sleep 5; curl -s -H 'Host: shop.localhost' {edge}/webhooks",
                '"count": 1: shop woke and got evt_demo_1 exactly once, replayed by the edge '
                '("attempt": "1", its "queued_id")',
            ),
        ]
    else:
        lines += [
            (
                webhook,
                "503 with Retry-After: queueing is off (no Redis), so shop refuses the webhook "
                "while asleep (Stripe retries) and the edge starts its wake",
            ),
            (
                f"sleep 4; {webhook}",
                '200 "webhook 200": the sender\'s retry reaches shop, awake now',
            ),
            (
                f"curl -s -H 'Host: shop.localhost' {edge}/webhooks",
                '"count": 1: shop got evt_demo_1 once (the refused try never reached it)',
            ),
        ]
    lines += [
        (
            f"curl -si -H 'Host: static.localhost' {edge}/",
            '200 "hello from static" at once: static is not scale-to-zero, always hot',
        ),
        (
            status,
            "the wake budget in use, apps by state (static hot; hello and shop hot until "
            f"idle for {demo.hello_idle} / {demo.shop_idle}), held requests, 503s by reason",
        ),
        (
            f"sleep {nap}; {status}",
            f"hello and shop are asleep again (cold) after {demo.hello_idle} / "
            f"{demo.shop_idle} without requests",
        ),
        (
            checkout,
            "503 with Retry-After: a plain POST is not safe to hold while shop sleeps; "
            "the edge starts the wake for the retry",
        ),
        (f"sleep 4; {checkout}", '200 "order placed by ...": the retry finds shop awake'),
        (hello, "hello wakes again: held ~1-2 s, then 200 with Server-Timing: wake phases"),
    ]
    return lines


def summary(demo: Demo, started: float | None) -> str:
    """What run-local prints once everything answers: addresses, then the try list."""
    admin = f"http://127.0.0.1:{demo.admin_port}"
    token = os.environ.get("CONTROL_PLANE_TOKEN", "")
    took = f" in {time.time() - started:.1f} s" if started else ""
    if demo.queueing:
        store = f"{demo.store}   private redis-server, data in {demo.shown(demo.run_dir)}/redis"
        store += " (AOF on)"
    else:
        store = f"memory://   QUEUEING IS OFF: {demo.store_note}; shop rejects webhooks (503)"
        store += " instead of queueing them"
    workers = f"{demo.workers} worker" + ("s" if demo.workers > 1 else "")
    out = [
        "",
        f"run-local: ready{took}",
        f"  edge      http://127.0.0.1:{demo.edge_port}/   ({workers}, "
        f"config {demo.shown(demo.edge_config)})",
        f"  admin     {admin}/   (/metrics, /admin/apps, /admin/queues)",
        f"  gallery   {admin}/gallery   (every machine, its state and gates: open in a browser)",
        f"  control   http://127.0.0.1:{demo.control_port}/   "
        f"(bearer token: CONTROL_PLANE_TOKEN={token})",
        f"  store     {store}",
        "  apps      hello and shop sleep until a request comes (scale to zero: the control",
        f"            plane starts them); static is always up on 127.0.0.1:{demo.static_port}",
        f"  logs      {demo.shown(demo.run_dir)}/*.log, apps in "
        f"{demo.shown(demo.run_dir)}/app-logs/; the edge logs below",
        "",
        "  try, one line at a time, in this order (under each: what it should show):",
    ]
    for command, expected in try_list(demo):
        out.append(f"    {command}")
        out.append(f"        # expected: {expected}")
    redis = " and redis" if demo.queueing else ""
    out += ["", f"  Ctrl-C stops the edge, the apps, the control plane{redis}.", ""]
    return "\n".join(out)


def render(args: argparse.Namespace) -> int:
    for name in ("hello_idle", "shop_idle"):
        try:
            seconds(getattr(args, name))
        except ValueError as exc:
            logger.error("%s: %s", name.upper(), exc)
            return 2
    demo = Demo(
        run_dir=Path(args.run_dir).resolve(),
        caller_dir=Path(args.caller_dir),
        venv=Path(args.venv),
        edge_port=args.edge_port,
        admin_port=args.admin_port,
        control_port=args.control_port,
        static_port=args.static_port,
        store=args.store,
        store_note=args.store_note,
        workers=args.workers,
        hello_idle=args.hello_idle,
        shop_idle=args.shop_idle,
    )
    demo.run_dir.mkdir(parents=True, exist_ok=True)
    demo.edge_config.write_text(render_edge(demo, Path(args.edge_template)))
    demo.controlplane_config.write_text(render_controlplane(demo, Path(args.controlplane_template)))
    fields = {name: str(value) for name, value in vars(demo).items()}
    (demo.run_dir / "demo.json").write_text(json.dumps(fields, indent=2) + "\n")
    return 0


def print_summary(args: argparse.Namespace) -> int:
    """The summary of the run `render` wrote to RUN_DIR/demo.json, on stdout."""
    fields = json.loads((Path(args.run_dir) / "demo.json").read_text())
    demo = Demo(
        **{
            **fields,
            "run_dir": Path(fields["run_dir"]),
            "caller_dir": Path(fields["caller_dir"]),
            "venv": Path(fields["venv"]),
            **{k: int(fields[k]) for k in PORT_FIELDS},
        }
    )
    sys.stdout.write(summary(demo, args.started))
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------ ports


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(args: argparse.Namespace) -> int:
    """The preferred port when nothing holds it, else any free one."""
    port = args.preferred
    if not port_is_free(port):
        port = free_port()
    sys.stdout.write(f"{port}\n")
    return 0


# ------------------------------------------------------------------------ waits


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of the shell counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _http_ready(url: str, instance: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            # A name to match: *our* process answers, not another that holds the port.
            return resp.status == 200 and (
                not instance or resp.headers.get("X-App-Instance") == instance
            )
    except (OSError, ValueError):
        return False


def wait(args: argparse.Namespace) -> int:
    """0 once it answers, 1 if the process exited first, 2 on timeout."""
    instance = args.instance.replace("{pid}", str(args.pid))
    deadline = time.monotonic() + args.timeout
    while True:
        if (
            (args.redis is None or redis_pong(args.redis))
            and (not args.http or _http_ready(args.http, instance))
            and (args.tcp is None or accepts(args.tcp))
        ):
            return 0
        if not _alive(args.pid):
            return 1
        if time.monotonic() > deadline:
            return 2
        time.sleep(0.05)


# -------------------------------------------------------------------- stop apps


def _call(url: str, method: str = "GET") -> Any:
    token = os.environ.get("CONTROL_PLANE_TOKEN", "")
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def stop_apps(args: argparse.Namespace) -> int:
    """Stop every live allocation and wait until they are: the control plane itself leaves
    app processes running when it stops (the next start adopts them)."""
    base = args.url.rstrip("/")
    deadline = time.monotonic() + args.timeout
    asked: set[str] = set()
    while True:
        try:
            allocations = _call(f"{base}/v1/allocations")["allocations"]
        except (OSError, ValueError, KeyError) as exc:
            logger.error("cannot list the control plane's allocations at %s: %s", base, exc)
            return 1
        live = [a for a in allocations if a["state"] not in TERMINAL_STATES]
        if not live:
            return 0
        for alloc in live:
            if alloc["id"] in asked or alloc["state"] == "draining":
                continue
            asked.add(alloc["id"])
            logger.info("stopping %s (%s, %s)", alloc["app"], alloc["id"], alloc["state"])
            try:
                _call(f"{base}/v1/allocations/{alloc['id']}/stop", "POST")
            except urllib.error.HTTPError as exc:
                # Still starting (409): asked again on the next pass, once it can stop.
                asked.discard(alloc["id"])
                logger.debug("stop %s: %s", alloc["id"], exc)
            except OSError as exc:
                logger.error("cannot stop %s: %s", alloc["id"], exc)
                return 1
        if time.monotonic() > deadline:
            names = ", ".join(f"{a['app']} ({a['id']}, {a['state']})" for a in live)
            logger.error("still running after %.0fs: %s", args.timeout, names)
            return 1
        time.sleep(0.2)


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="run-local: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    r = commands.add_parser("render", help="write edge.toml, controlplane.toml, demo.json")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--caller-dir", default=os.getcwd(), help="paths are shown relative to it")
    r.add_argument("--venv", default=str(ROOT / ".venv"))
    r.add_argument("--edge-template", default=str(ROOT / "configs" / "local.toml"))
    r.add_argument(
        "--controlplane-template", default=str(ROOT / "configs" / "controlplane.local.toml")
    )
    r.add_argument("--edge-port", type=int, default=8080)
    r.add_argument("--admin-port", type=int, default=9090)
    r.add_argument("--control-port", type=int, default=9400)
    r.add_argument("--static-port", type=int, default=9001)
    r.add_argument("--store", default="memory://")
    r.add_argument("--store-note", default="", help="why the store is memory://")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--hello-idle", default="20s")
    r.add_argument("--shop-idle", default="20s")

    m = commands.add_parser("summary", help="print the addresses and the try list")
    m.add_argument("--run-dir", required=True)
    m.add_argument("--started", type=float, default=None, help="unix time the demo started")

    p = commands.add_parser("port", help="print PREFERRED if free, else a free port")
    p.add_argument("preferred", type=int)

    w = commands.add_parser("wait", help="wait until a process answers")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--http", default="", help="a URL that answers 200 once ready")
    w.add_argument("--instance", default="", help="X-App-Instance expected; {pid} is the pid")
    w.add_argument("--redis", type=int, default=None, help="a port that answers PING")
    w.add_argument("--tcp", type=int, default=None, help="a port that accepts connections")
    w.add_argument("--timeout", type=float, default=15.0)

    s = commands.add_parser("stop-apps", help="stop every live allocation of the control plane")
    s.add_argument("--url", required=True)
    s.add_argument("--timeout", type=float, default=20.0)

    args = parser.parse_args(argv)
    handlers = {
        "render": render,
        "summary": print_summary,
        "port": pick_port,
        "wait": wait,
        "stop-apps": stop_apps,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        # Ctrl-C while run-local starts: run-local's own trap stops what it started.
        return 130


if __name__ == "__main__":
    sys.exit(main())
