"""Locust scenarios against the edge: wake stampedes, fleet wakes, webhooks while cold,
and hot traffic with periodic sleeps.

    locust -f bench/locustfile.py --headless -u 2000 -r 2000 -t 30s \\
        --host http://127.0.0.1:8080 SingleAppStampede --stampede-host stampede.localhost

Pick a scenario by class name (SingleAppStampede, FleetWake, WebhookWhileCold,
HotWithSleeps) or by tag (stampede, fleet, webhooks, cycling). Each is
parameterised by the options below (or the environment variables in brackets);
users, spawn rate, run time and the edge's address are locust's own
(-u, -r, -t, --host). Every server a run targets must be on 127.0.0.1.

Like browsers and webhook senders, each user keeps its connection alive
(FastHttpUser) and names its app in the Host header. Every request has a
connect and a network timeout, so a run stops by itself even if the edge hangs.

Custom events, on top of locust's own rows:
- "WAKE <scenario>": per request that waited for a wake, the wait the edge
  reported (Server-Timing: wake;dur=ms) as the response time;
- "503 <reason>": per refusal with Retry-After, by X-Edge-Error (a refusal with
  Retry-After is an answer, not a failure; the sender retries);
- failures: anything that is not 200, 202 or 503 + Retry-After (lost requests).
With --outcomes-file FILE, the counts by outcome (and of requests sent) are
written there as JSON when the run stops, so a report can check that every
request sent got an answer. When the run stops, no new request is sent and
those in flight get up to 135 s to be answered before locust stops its users.
Locust's "Aggregated" row adds the WAKE and 503 rows to the requests; read the
per-request rows instead.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
import time
from collections import Counter
from typing import Any

import gevent.event
from bench_stack import wake_wait_ms
from locust import between, events, tag, task
from locust.contrib.fasthttp import FastHttpUser

# Outcomes of every request this process sent: "200", "202", "503 <reason>",
# "lost <status or error>"; SENT counts requests before they go out.
OUTCOMES: Counter[str] = Counter()
SENT = [0]
INTERRUPTED: Counter[str] = Counter()  # requests cut short in this process, by exception
IN_FLIGHT = [0]
STOPPING = gevent.event.Event()
# At the end of a run, requests in flight get this long to be answered before locust
# stops the users (it kills users mid-request); above the edge's longest hold.
DRAIN_TIMEOUT = 135.0
_OUTCOMES_LOCK = threading.Lock()
ALL_SPAWNED = gevent.event.Event()
# Longest a stampede user waits for the others to spawn before it fires anyway.
SPAWN_WAIT = 60.0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--stampede-host",
        env_var="STAMPEDE_HOST",
        default="stampede.localhost",
        help="Host of the one cold app (SingleAppStampede)",
    )
    parser.add_argument(
        "--fleet-hosts",
        env_var="FLEET_HOSTS",
        default="fleet-{i}.localhost",
        help="Host pattern of the fleet, {i} from 0 (FleetWake)",
    )
    parser.add_argument(
        "--fleet-size", env_var="FLEET_SIZE", type=int, default=300, help="apps in the fleet"
    )
    parser.add_argument(
        "--webhook-hosts",
        env_var="WEBHOOK_HOSTS",
        default="hooks-queue.localhost,hooks-reject.localhost",
        help="comma-separated Hosts of the webhook apps (WebhookWhileCold)",
    )
    parser.add_argument(
        "--cycling-hosts",
        env_var="CYCLING_HOSTS",
        default="cycle-{i}.localhost",
        help="Host pattern of the apps that sleep and wake (HotWithSleeps)",
    )
    parser.add_argument(
        "--cycling-size", env_var="CYCLING_SIZE", type=int, default=4, help="apps that cycle"
    )
    parser.add_argument(
        "--cycle-period",
        env_var="CYCLE_PERIOD",
        type=float,
        default=6.0,
        help="seconds traffic stays on one cycling app before moving to the next",
    )
    parser.add_argument(
        "--outcomes-file",
        env_var="OUTCOMES_FILE",
        default="",
        help="write the counts by outcome here (JSON) when the run stops",
    )


@events.spawning_complete.add_listener
def _spawned(user_count: int, **_: Any) -> None:
    ALL_SPAWNED.set()


@events.test_stopping.add_listener
def _drain(**_: Any) -> None:
    """No new requests from here on; wait for the ones in flight to be answered."""
    STOPPING.set()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while IN_FLIGHT[0] > 0 and time.monotonic() < deadline:
        gevent.sleep(0.05)


@events.test_stop.add_listener
def _write_outcomes(environment: Any, **_: Any) -> None:
    """Once every user has stopped (test_stop fires after that; `quitting` fires before
    the runner stops its users): our outcomes and locust's own request count."""
    path = environment.parsed_options.outcomes_file if environment.parsed_options else ""
    if path:
        sent = sum(
            entry.num_requests
            for (_, method), entry in environment.stats.entries.items()
            if method not in ("WAKE", "503")
        )
        waits = [e for (_, method), e in environment.stats.entries.items() if method == "WAKE"]
        waited = {
            "count": sum(e.num_requests for e in waits),
            "p50": max((e.get_response_time_percentile(0.5) for e in waits), default=None),
            "p99": max((e.get_response_time_percentile(0.99) for e in waits), default=None),
        }
        with _OUTCOMES_LOCK:
            data = {
                "outcomes": dict(OUTCOMES),
                "requests": sum(OUTCOMES.values()),
                "sent": SENT[0],
                "interrupted": dict(INTERRUPTED),
                "locust_requests": sent,
                "wake_wait_ms": waited,
            }
        with open(path, "w") as out:
            json.dump(data, out, indent=2)


def _count(outcome: str) -> None:
    with _OUTCOMES_LOCK:
        OUTCOMES[outcome] += 1


class EdgeUser(FastHttpUser):
    """A user with one kept-alive connection, bounded timeouts and outcome accounting."""

    abstract = True
    connection_timeout = 10.0
    # Above the edge's own bound on a request it holds (configs/stampede.toml: hold 60 s,
    # then upstream response headers 60 s), so every answer is the edge's, not a guess.
    network_timeout = 130.0
    scenario = "edge"

    def fetch(self, method: str, host: str, path: str, **kwargs: Any) -> None:
        headers = {"Host": host, **kwargs.pop("headers", {})}
        if STOPPING.is_set():
            return
        with _OUTCOMES_LOCK:
            SENT[0] += 1
        IN_FLIGHT[0] += 1
        try:
            with self.client.request(
                method, path, headers=headers, name=f"{method} {self.scenario}",
                catch_response=True, **kwargs,
            ) as response:  # fmt: skip
                self._judge(response)
        except BaseException as exc:
            with _OUTCOMES_LOCK:
                INTERRUPTED[type(exc).__name__] += 1
            raise
        finally:
            IN_FLIGHT[0] -= 1

    def _judge(self, response: Any) -> None:
        status = response.status_code
        timing = response.headers.get("Server-Timing") if response.headers else None
        if isinstance(timing, list):  # the header repeated
            timing = ",".join(timing)
        waited = wake_wait_ms(timing)
        if waited is not None:
            events.request.fire(
                request_type="WAKE",
                name=self.scenario,
                response_time=waited,
                response_length=0,
                exception=None,
                context={},
            )
        if status in (200, 202):
            _count(str(status))
            response.success()
        elif status == 503 and response.headers.get("Retry-After"):
            reason = response.headers.get("X-Edge-Error", "unknown")
            _count(f"503 {reason}")
            response.success()
            events.request.fire(
                request_type="503",
                name=reason,
                response_time=response.request_meta["response_time"],
                response_length=0,
                exception=None,
                context={},
            )
        else:
            error = getattr(response, "error", None) or ""
            kind = str(status) if status else type(error).__name__ or "error"
            _count(f"lost {kind}")
            response.failure(f"lost: {kind} {error}"[:200])


@tag("stampede")
class SingleAppStampede(EdgeUser):
    """Every user hits one cold app at the same instant, then keeps browsing it."""

    scenario = "stampede"
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        ALL_SPAWNED.wait(SPAWN_WAIT)

    @task
    def get(self) -> None:
        self.fetch("GET", self.environment.parsed_options.stampede_host, "/")


@tag("fleet")
class FleetWake(EdgeUser):
    """Users spread over many cold apps: the wake budget limits the scheduler's load."""

    scenario = "fleet"
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.hosts = [options.fleet_hosts.format(i=i) for i in range(options.fleet_size)]

    @task
    def get(self) -> None:
        self.fetch("GET", random.choice(self.hosts), "/")


@tag("webhooks")
class WebhookWhileCold(EdgeUser):
    """Signed POSTs mixed with GETs to cold apps (one app per policy: queue, reject)."""

    scenario = "webhooks"
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.hosts = [h for h in self.environment.parsed_options.webhook_hosts.split(",") if h]

    @task(1)
    def webhook(self) -> None:
        event = f"evt_{secrets.token_hex(8)}"
        body = json.dumps({"id": event, "type": "payment.succeeded", "at": time.time()})
        headers = {
            "Content-Type": "application/json",
            "X-Signature": f"t={int(time.time())},v1={secrets.token_hex(16)}",
            "X-Event-Id": event,
        }
        self.fetch("POST", random.choice(self.hosts), "/hooks/payment", data=body, headers=headers)

    @task(2)
    def get(self) -> None:
        self.fetch("GET", random.choice(self.hosts), "/")


@tag("cycling")
class HotWithSleeps(EdgeUser):
    """Steady traffic that moves from app to app, so each one idles, sleeps and wakes."""

    scenario = "cycling"
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.hosts = [options.cycling_hosts.format(i=i) for i in range(options.cycling_size)]
        self.period = options.cycle_period

    @task
    def get(self) -> None:
        # Everyone is on the same app at once; the others idle past their idle timeout.
        current = int(time.time() / self.period) % len(self.hosts)
        self.fetch("GET", self.hosts[current], "/")


def _loopback_only(environment: Any) -> None:
    host = environment.host or ""
    if host and not host.startswith(("http://127.0.0.1", "https://127.0.0.1")):
        raise SystemExit(f"locustfile: --host must be on 127.0.0.1, got {host!r}")


@events.init.add_listener
def _check_host(environment: Any, **_: Any) -> None:
    if os.environ.get("LOCUST_ALLOW_ANY_HOST") != "1":
        _loopback_only(environment)
