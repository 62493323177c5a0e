#!/usr/bin/env python3
"""Webhooks-while-cold benchmark: N signed POSTs queued for a cold app, replayed once.

Starts, all on 127.0.0.1 and free ports, in its own temp dir:

    the store           --store redis: a redis-server, AOF on, appendfsync always (a
                        202 survives a Redis restart), and with --min-replicas-acked N
                        also N replicas of it (--replicaof, the same AOF), online first;
                        --store cluster: a local Redis Cluster (3 masters, one replica
                        each, or N with N > 1; the same AOF), redis+cluster:// URL
    edge controlplane   one app: bench/apps/sample_app.py --start-delay S --record FILE
    edge run            the app scale_to_zero, POST /hooks/* classified `queue`,
                        a replay policy, the store, --workers N, and
                        [store] min_replicas_acked = N (a 202 waits for N replicas:
                        WAIT; none confirmed within replica_ack_timeout: 503)

then sends --webhooks POSTs (unique X-Event-Id, body {"n": i}) from --clients
concurrent keep-alive connections while the app is still starting, waits for
the replay, and counts from the app's own record of what it received:

    sent, accepted (202), refused (anything else): errors (no answer, or neither
                     202 nor 503) and 503s by reason
    latency_202      per-request latency of the answers that were 202 (p50/p99)
    delivered_once   distinct webhooks the app answered 200 to
    duplicates       deliveries beyond the first of a webhook
    lost             accepted but never delivered
    queue_rps        accepted / time from the first send to the last 202
    replay_rps       deliveries / time from the first to the last delivery

With --resend F, a fraction F of the webhooks is sent a second time (same
event id, as a sender retrying after a timeout): each must be answered 202 with
the first id and delivered once.

--quick: 40 webhooks from 8 clients, the app starts in 1 s.

Nothing resends a 503 (a bench without faults expects none): it is counted, and its
webhook is not among the accepted ones (it may be delivered all the same).

Prints a table, writes JSON (--json FILE). Every process it starts is stopped
on the way out, also on errors and Ctrl-C. Exits 1 when a webhook was lost or
delivered twice.

    .venv/bin/python bench/webhooks.py --json /tmp/webhooks.json
    .venv/bin/python bench/webhooks.py --store cluster --min-replicas-acked 1

JSON keys (--json FILE):
    sent                 POSTs sent, resends included
    accepted             first sends answered 202
    refused              first sends answered anything else (0: a client error)
    statuses             first sends by status
    resent               webhooks sent a second time
    resent_same_id       resends answered 202 with the first send's queued_id
    resent_statuses      resends by status
    errors               sends (resends too) with no answer, or neither 202 nor 503
    status_503           sends (resends too) answered 503
    reasons_503          the 503s by X-Edge-Error ("queue_unavailable (replica ack)"
                         when fewer replicas than asked confirmed in time)
    latency_202_p50_ms   per-request latency of the first sends answered 202 (ms)
    latency_202_p99_ms
    latency_202_max_ms
    delivered_once       distinct webhooks the app answered 200 to
    duplicates           deliveries beyond the first of a webhook (0 wanted)
    lost                 accepted but never delivered (0 wanted)
    delivery_attempts    requests the app received, failures included
    queue_seconds        from the first send to the last 202
    queue_rps            accepted / queue_seconds
    replay_seconds       from the first delivery to the last
    replay_rps           deliveries / replay_seconds
    delivered_before_queueing_ended   deliveries before the last send was answered
    queues_after         /admin/queues after the replay
    edge_queue_metrics   the edge_queue* lines of /metrics after the replay
    store                redis or cluster
    min_replicas_acked   the edge's [store] min_replicas_acked
    config               webhooks, clients, workers, start_delay_s, redis (the
                         store's processes), replica_ack_timeout_s, app
    machine              nproc, cpu, python, platform, load average at the start
    quick                whether --quick sized the run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench_stack import (
    COLD_APP,
    COLD_HOST,
    Processes,
    add_quick,
    apply_quick,
    bench_cluster,
    http_get,
    install_signal_handlers,
    logger,
    machine_info,
    percentile,
    r3,
    raise_open_file_limit,
    start_cold_app_stack,
    start_redis_with_replicas,
    write_json,
)

QUICK = {"webhooks": 40, "clients": 8, "start_delay": 1.0, "replay_timeout": 60.0}

log = logger("webhooks")


def settings(max_held: int) -> dict[str, Any]:
    return {
        "hold_timeout": "60s",
        "max_held": max_held,
        "rules": [{"class": "queue", "methods": ["POST"], "path_prefix": "/hooks/"}],
        "replay": {
            "max_attempts": 5,
            "retention": "24h",
            "dedupe_key": "header:X-Event-Id",
            "max_body": "64KiB",
            "max_queued": 1_000_000,
        },
    }


@dataclass
class Sent:
    """What the sends of one phase got back (status 0: no answer)."""

    statuses: Counter[int] = field(default_factory=Counter)
    ids: dict[int, str] = field(default_factory=dict)  # event -> queued_id of its 202
    latencies_202: list[float] = field(default_factory=list)  # seconds
    reasons_503: Counter[str] = field(default_factory=Counter)
    first: float = 0.0
    last: float = 0.0  # the last 202

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in (202, 503))


def reason_503(headers: Any, body: bytes) -> str:
    """A 503's X-Edge-Error, naming a missing replica ack as such."""
    kind = headers.get("X-Edge-Error") or "unknown"
    if kind == "queue_unavailable" and b"replicas" in body:
        return "queue_unavailable (replica ack)"
    return kind


async def send_all(port: int, events: list[int], clients: int, timeout: float) -> Sent:
    """POST every event once over `clients` keep-alive connections; what came back."""
    sent = Sent()
    todo = iter(events)
    url = f"http://127.0.0.1:{port}/hooks/payment"
    sent.first = sent.last = time.monotonic()

    async def client(session: aiohttp.ClientSession) -> None:
        for n in todo:
            headers = {
                "Host": COLD_HOST,
                "X-Event-Id": f"evt_{n}",
                "X-Signature": f"t={n},v1={secrets.token_hex(8)}",
                "Content-Type": "application/json",
            }
            began = time.monotonic()
            try:
                async with session.post(url, data=b'{"n": %d}' % n, headers=headers) as resp:
                    body = await resp.read()
                    sent.statuses[resp.status] += 1
                    if resp.status == 202:
                        sent.last = time.monotonic()
                        sent.latencies_202.append(sent.last - began)
                        sent.ids.setdefault(n, json.loads(body)["queued_id"])
                    elif resp.status == 503:
                        sent.reasons_503[reason_503(resp.headers, body)] += 1
            except (aiohttp.ClientError, TimeoutError):
                sent.statuses[0] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.wait_for(
            asyncio.gather(*(client(session) for _ in range(clients))), timeout * 4
        )
    return sent


def deliveries(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    out = []
    for line in record.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def wait_for_replay(record: Path, expected: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        got = deliveries(record)
        done = len({d["body"] for d in got if d["status"] == 200})
        if done >= expected:
            time.sleep(2.0)  # anything delivered twice would show up now
            return deliveries(record)
        if done != seen:
            seen = done
        time.sleep(0.2)
    log(f"replay incomplete after {timeout:g}s")
    return deliveries(record)


def start_store(
    args: argparse.Namespace, tmp: Path, procs: Processes, stack: contextlib.ExitStack
) -> tuple[str, str]:
    """The store's URL and what runs it: a redis-server (with replicas when acks are
    asked), or a local cluster that `stack` stops."""
    replicas = args.min_replicas_acked
    if args.store == "cluster":
        per_master = max(1, replicas)
        cluster = stack.enter_context(bench_cluster(tmp, per_master, appendfsync="always"))
        log(f"redis cluster up in {cluster.start_seconds:.1f}s: {cluster.url}")
        nodes = f"{len(cluster.nodes)} nodes, 3 masters x {per_master} replica(s)"
        return cluster.url, f"redis cluster, {nodes}, AOF appendfsync always"
    store = start_redis_with_replicas(procs, tmp, replicas, appendfsync="always")
    return store, f"redis-server + {replicas} replica(s), AOF appendfsync always"


def run(
    args: argparse.Namespace, tmp: Path, procs: Processes, stack: contextlib.ExitStack
) -> dict[str, Any]:
    machine = machine_info()  # the load average before this run's own processes
    token = secrets.token_urlsafe(24)
    record = tmp / "deliveries.jsonl"
    store, store_processes = start_store(args, tmp, procs, stack)
    store_section = {
        "min_replicas_acked": args.min_replicas_acked,
        "replica_ack_timeout": f"{args.replica_ack_timeout:g}s",
    }
    _, edge = start_cold_app_stack(
        procs,
        tmp,
        token,
        store,
        args.workers,
        args.start_delay,
        ("--record", str(record)),
        settings(args.clients),
        sections={"store": store_section},
    )
    log(f"edge ready: workers {edge.workers}, {store_processes}, {store_section}")
    log(f"sending {args.webhooks} webhooks")
    events = list(range(args.webhooks))
    resent = events[: int(args.webhooks * args.resend)]
    first = asyncio.run(send_all(edge.port, events, args.clients, 60))
    statuses, ids = first.statuses, first.ids
    queue_seconds = first.last - first.first
    early = deliveries(record)
    log(f"queued: {dict(statuses)} in {queue_seconds:.2f}s; {len(early)} delivered meanwhile")
    again = Sent()
    if resent:
        again = asyncio.run(send_all(edge.port, resent, args.clients, 60))
    dup_statuses, dup_ids = again.statuses, again.ids
    accepted = statuses[202]
    latencies_ms = [x * 1000 for x in first.latencies_202]
    got = wait_for_replay(record, accepted, args.replay_timeout)
    ok = [d for d in got if d["status"] == 200]
    per_event = Counter(d["body"] for d in ok)
    delivered_once = len(per_event)
    accepted_bodies = {f'{{"n": {n}}}' for n in ids}
    lost = len(accepted_bodies - set(per_event))
    duplicates = sum(count - 1 for count in per_event.values())
    times = sorted(d["at"] for d in ok)
    replay_seconds = times[-1] - times[0] if len(times) > 1 else 0.0
    _, queues = http_get(edge.admin_port, "/admin/queues")
    _, metrics = http_get(edge.admin_port, "/metrics")
    return {
        "sent": len(events) + len(resent),
        "accepted": accepted,
        "refused": sum(n for status, n in statuses.items() if status != 202),
        "statuses": {str(k): v for k, v in statuses.items()},
        "resent": len(resent),
        "resent_same_id": sum(1 for n in resent if dup_ids.get(n) == ids.get(n)),
        "resent_statuses": {str(k): v for k, v in dup_statuses.items()},
        "errors": first.errors + again.errors,
        "status_503": statuses[503] + dup_statuses[503],
        "reasons_503": dict(first.reasons_503 + again.reasons_503),
        "latency_202_p50_ms": r3(percentile(latencies_ms, 50)),
        "latency_202_p99_ms": r3(percentile(latencies_ms, 99)),
        "latency_202_max_ms": r3(max(latencies_ms, default=None)),
        "delivered_once": delivered_once,
        "duplicates": duplicates,
        "lost": lost,
        "delivery_attempts": len(got),
        "queue_seconds": round(queue_seconds, 3),
        "queue_rps": round(accepted / queue_seconds, 1) if queue_seconds > 0 else None,
        "replay_seconds": round(replay_seconds, 3),
        "replay_rps": round(len(ok) / replay_seconds, 1) if replay_seconds > 0 else None,
        "delivered_before_queueing_ended": len(early),
        "queues_after": json.loads(queues) if queues.startswith(b"{") else queues.decode(),
        "edge_queue_metrics": [
            line
            for line in metrics.decode(errors="replace").splitlines()
            if line.startswith("edge_queue") and not line.startswith("#")
        ],
        "store": args.store,
        "min_replicas_acked": args.min_replicas_acked,
        "config": {
            "webhooks": args.webhooks,
            "clients": args.clients,
            "workers": args.workers,
            "start_delay_s": args.start_delay,
            "redis": store_processes,
            "replica_ack_timeout_s": args.replica_ack_timeout,
            "app": COLD_APP,
        },
        "machine": machine,
        "quick": args.quick,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--webhooks", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resend", type=float, default=0.1, help="fraction sent twice")
    parser.add_argument(
        "--start-delay", type=float, default=20.0, help="app start time: queueing ends before it"
    )
    parser.add_argument("--replay-timeout", type=float, default=300.0)
    parser.add_argument(
        "--store",
        choices=("redis", "cluster"),
        default="redis",
        help="redis: one redis-server (redis://); cluster: a local Redis Cluster",
    )
    parser.add_argument(
        "--min-replicas-acked",
        type=int,
        default=0,
        help="[store] min_replicas_acked: replicas that confirm an entry before its 202 (0)",
    )
    parser.add_argument(
        "--replica-ack-timeout",
        type=float,
        default=0.5,
        help="[store] replica_ack_timeout in s (0.5)",
    )
    parser.add_argument("--json", type=Path, default=None)
    add_quick(parser, QUICK)
    args = parser.parse_args(argv)
    apply_quick(parser, args)
    if not 0 <= args.resend <= 1:
        parser.error("--resend must be between 0 and 1")
    if not 0 <= args.min_replicas_acked <= 4:
        parser.error("--min-replicas-acked must be between 0 and 4")
    if not 0.01 <= args.replica_ack_timeout <= 1.5:
        parser.error("--replica-ack-timeout must be between 0.01 and 1.5 (s)")
    raise_open_file_limit()
    install_signal_handlers()
    with (
        tempfile.TemporaryDirectory(prefix="webhooks-bench-") as tmp_dir,
        contextlib.ExitStack() as stack,  # the cluster: stopped after the edge
    ):
        procs = Processes(Path(tmp_dir))
        try:
            result = run(args, Path(tmp_dir), procs, stack)
        finally:
            procs.stop_all()
    rows = [
        ("store", f"{result['store']}, min_replicas_acked {result['min_replicas_acked']}"),
        ("sent", result["sent"]),
        ("accepted (202)", result["accepted"]),
        ("refused", result["refused"]),
        ("errors", result["errors"]),
        ("503", f"{result['status_503']} {result['reasons_503'] or ''}".strip()),
        ("resent, same id", f"{result['resent_same_id']} of {result['resent']}"),
        ("delivered once", result["delivered_once"]),
        ("duplicates", result["duplicates"]),
        ("lost", result["lost"]),
        ("queue rps", result["queue_rps"]),
        ("replay rps", result["replay_rps"]),
        ("202 p50 / p99 ms", f"{result['latency_202_p50_ms']} / {result['latency_202_p99_ms']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json is not None:
        write_json(args.json, result, __doc__)
        log(f"wrote {args.json}")
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
