"""Unsafe requests to a cold app through real edges, Redis (AOF), control plane and app:
reject, or queue durably (202) and replay exactly once, in order, with retries and
dead letters; the edge SIGKILLed after its 202s; Redis down; oversized bodies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from helpers import eventually, free_port, metric_sum, to_toml
from stack import CONTROL_PLANE_TOKEN, sample_app_spec
from webhooks import HOST, WebhookApp, replay_policy, shop, start_queue_edge


async def send(
    session, edge, event: str, body: bytes = b'{"amount": 100}', path: str = "/hooks/pay"
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Host": HOST, "X-Signature": "t=1,v1=abc", "Content-Type": "application/json"}
    if event:
        headers["X-Event-Id"] = event
    async with session.post(edge.url + path, data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def admin(session, edge, method: str, path: str) -> tuple[int, Any]:
    async with session.request(method, edge.admin_url + path, headers=edge.admin_headers()) as resp:
        return resp.status, await resp.json()


async def delivered(app: WebhookApp, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    await eventually(
        lambda: len(app.successes()) >= count,
        timeout=timeout,
        interval=0.1,
        what=f"{count} successful deliveries",
    )
    return app.deliveries()


async def test_webhook_with_reject_policy_gets_503_and_starts_the_wake(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path)
    cp = start_control_plane(apps=[hooks.spec])
    rules = [{"class": "reject", "methods": ["POST"], "header": "X-Signature"}]
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(rules=rules))
    status, headers, body = await send(client, edge, "evt_1")
    assert status == 503, body
    assert int(headers["Retry-After"]) >= 1
    assert body.count(b"\n") == 1 and b"starting" in body

    async def woke() -> bool:
        return (await send(client, edge, "evt_1"))[0] == 200

    await eventually(woke, timeout=30, interval=0.3, what="the sender's retry finds the app hot")
    assert [d["status"] for d in hooks.deliveries()] == [200]


async def test_queued_webhook_is_accepted_then_delivered_once(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop())
    status, headers, body = await send(client, edge, "evt_1", b'{"n": 1}')
    assert status == 202, body
    answer = json.loads(body)
    assert answer["queued_id"] == headers["X-Edge-Queued-Id"] and not answer["duplicate"]
    assert hooks.deliveries() == []  # the app is still starting
    hooks.open()
    [delivery] = await delivered(hooks, 1)
    assert delivery["queued_id"] == answer["queued_id"]
    assert (delivery["method"], delivery["path"], delivery["body"]) == (
        "POST",
        "/hooks/pay",
        '{"n": 1}',
    )
    assert delivery["signature"] == "t=1,v1=abc" and delivery["attempt"] == "1"
    await asyncio.sleep(1.5)
    assert len(hooks.deliveries()) == 1
    metrics = edge.metrics()
    assert metric_sum(metrics, "edge_queue_events_total", app="shop", event="accepted") == 1
    assert metric_sum(metrics, "edge_queue_events_total", app="shop", event="delivered") == 1
    assert metric_sum(metrics, "edge_queue_depth", app="shop") == 0
    # Hot now: the same request is proxied, not queued.
    status, _, body = await send(client, edge, "evt_2")
    assert status == 200 and body == b"webhook 200\n"


async def test_duplicate_sends_are_one_delivery(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop())
    answers = [await send(client, edge, "evt_same", b'{"try": %d}' % i) for i in range(3)]
    assert [status for status, _, _ in answers] == [202, 202, 202]
    ids = {json.loads(body)["queued_id"] for _, _, body in answers}
    assert len(ids) == 1
    assert [json.loads(body)["duplicate"] for _, _, body in answers] == [False, True, True]
    # Without a key header the hash of method, path and body is the key.
    keyless = [await send(client, edge, "", b'{"same": "body"}') for _ in range(2)]
    assert keyless[0][2] != b"" and json.loads(keyless[1][2])["duplicate"]
    hooks.open()
    await delivered(hooks, 2)
    await asyncio.sleep(1)
    bodies = [d["body"] for d in hooks.deliveries()]
    assert sorted(bodies) == sorted(['{"try": 0}', '{"same": "body"}']), bodies
    assert (
        metric_sum(edge.metrics(), "edge_queue_events_total", app="shop", event="dedupe_hit") == 3
    )


async def test_500_twice_then_200_is_three_attempts_one_success(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, statuses="500 500 200")
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop())
    status, _, body = await send(client, edge, "evt_retry")
    assert status == 202
    queued_id = json.loads(body)["queued_id"]
    deliveries = await delivered(hooks, 1)
    assert [(d["status"], d["attempt"], d["queued_id"]) for d in deliveries] == [
        (500, "1", queued_id),
        (500, "2", queued_id),
        (200, "3", queued_id),
    ]
    # The app records a delivery before it answers; the edge counts it once answered.
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_queue_events_total", event="delivered") == 1,
        what="the delivery counted",
    )
    metrics = edge.metrics()
    assert metric_sum(metrics, "edge_queue_events_total", app="shop", event="retried") == 2
    assert metric_sum(metrics, "edge_queue_events_total", app="shop", event="delivered") == 1
    assert metric_sum(metrics, "edge_queue_dead_letters", app="shop") == 0


async def test_400_is_dead_lettered_listed_and_replayed_after_the_fix(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, statuses="400")
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(), admin_token="admin-secret")
    status, _, body = await send(client, edge, "evt_bad")
    assert status == 202
    queued_id = json.loads(body)["queued_id"]

    async def dead_lettered() -> list[dict[str, Any]]:
        _, listing = await admin(client, edge, "GET", "/admin/queues/shop/dead")
        return listing["dead"]

    await eventually(dead_lettered, timeout=30, interval=0.2, what="a dead letter")
    [dead] = await dead_lettered()
    assert (dead["queued_id"], dead["status"], dead["attempts"]) == (queued_id, 400, 1)
    assert len(hooks.deliveries()) == 1  # a 4xx is not retried
    status, overview = await admin(client, edge, "GET", "/admin/queues")
    assert overview["queues"] == [{"app": "shop", "queued": 0, "dead_letters": 1}]
    # Unauthenticated, unknown or malformed requests are refused cleanly.
    async with client.get(edge.admin_url + "/admin/queues/shop/dead") as resp:
        assert resp.status == 401
    assert (await admin(client, edge, "GET", "/admin/queues/nope/dead"))[0] == 404
    assert (await admin(client, edge, "GET", "/admin/queues/shop/dead?limit=0"))[0] == 400
    bad = await admin(client, edge, "POST", "/admin/queues/shop/dead/x/replay")
    assert bad[0] == 400
    missing = await admin(client, edge, "POST", "/admin/queues/shop/dead/1-1/replay")
    assert missing[0] == 404

    hooks.status_file.write_text("200")  # the app is fixed
    status, replayed = await admin(
        client, edge, "POST", f"/admin/queues/shop/dead/{dead['id']}/replay"
    )
    assert status == 200, replayed
    deliveries = await delivered(hooks, 1)
    assert [(d["status"], d["queued_id"]) for d in deliveries] == [
        (400, queued_id),
        (200, replayed["queued_id"]),
    ]
    assert await dead_lettered() == []
    metrics = edge.metrics()
    assert metric_sum(metrics, "edge_queue_events_total", app="shop", event="dead_lettered") == 1


async def test_purge_removes_queued_and_dead_requests(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=30)  # stays cold for the whole test
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop())
    for i in range(3):
        assert (await send(client, edge, f"evt_{i}"))[0] == 202
    status, listing = await admin(client, edge, "GET", "/admin/queues/shop/queued?limit=2")
    assert status == 200 and len(listing["queued"]) == 2
    first = listing["queued"][0]
    assert first["method"] == "POST" and first["path"] == "/hooks/pay" and first["body_bytes"] == 15
    assert (await admin(client, edge, "DELETE", f"/admin/queues/shop/queued/{first['id']}"))[1] == {
        "app": "shop",
        "purged": 1,
    }
    assert (await admin(client, edge, "DELETE", "/admin/queues/shop/queued"))[1]["purged"] == 2
    assert (await admin(client, edge, "GET", "/admin/queues"))[1]["queues"][0]["queued"] == 0
    assert metric_sum(edge.metrics(), "edge_queue_depth", app="shop") == 0


async def test_oversized_body_is_413_and_nothing_is_queued(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=30)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop())
    big = b"x" * (64 * 1024 + 1)
    status, _, _ = await send(client, edge, "evt_big", big)
    assert status == 413

    async def chunks():
        for _ in range(5):
            yield b"y" * 20_000

    async with client.post(
        edge.url + "/hooks/pay", data=chunks(), headers={"Host": HOST, "X-Event-Id": "evt_chunked"}
    ) as resp:
        assert resp.status == 413
    assert (await send(client, edge, "evt_fits", b"z" * (64 * 1024)))[0] == 202
    _, overview = await admin(client, edge, "GET", "/admin/queues")
    assert overview["queues"][0]["queued"] == 1
    # The gauge is the worker's snapshot (every 0.5 s): one taken mid-upload still says 1.
    await eventually(
        lambda: metric_sum(edge.metrics(), "edge_held_requests") == 0, what="nothing held"
    )


async def test_redis_down_answers_503_never_202(
    start_control_plane, start_edge, client, tmp_path, own_redis
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=30)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, own_redis.url, shop())
    assert (await send(client, edge, "evt_before"))[0] == 202
    own_redis.stop()
    for i in range(3):
        status, headers, body = await send(client, edge, f"evt_down_{i}")
        assert status == 503, body
        assert int(headers["Retry-After"]) >= 1
        assert headers["X-Edge-Error"] == "queue_unavailable"
    own_redis.start()  # AOF: what was acknowledged is still there
    status, _, body = await send(client, edge, "evt_before")
    assert status == 202 and json.loads(body)["duplicate"]


async def test_edge_killed_after_202s_then_restarted_delivers_all_exactly_once(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec])
    listen = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(), **listen)
    answers = await asyncio.gather(
        *(send(client, edge, f"evt_{i}", b'{"n": %d}' % i) for i in range(100))
    )
    assert [status for status, _, _ in answers] == [202] * 100
    os.killpg(edge.proc.pid, signal.SIGKILL)
    edge.proc.wait(5)
    edge.stopped = True
    assert hooks.deliveries() == []  # killed before the app was up: nothing was replayed

    restarted = start_queue_edge(start_edge, cp, fresh_redis, shop(), **listen)
    hooks.open()
    deliveries = await delivered(hooks, 100, timeout=60)
    await asyncio.sleep(1)
    deliveries = hooks.deliveries()
    bodies = [json.loads(d["body"])["n"] for d in deliveries]
    assert sorted(bodies) == list(range(100)), f"{len(bodies)} deliveries"
    queued_ids = {json.loads(body)["queued_id"] for _, _, body in answers}
    assert {d["queued_id"] for d in deliveries} == queued_ids
    _, overview = await admin(client, restarted, "GET", "/admin/queues")
    assert overview["queues"] == [{"app": "shop", "queued": 0, "dead_letters": 0}]


async def test_two_edges_replaying_one_app_deliver_each_once_in_order(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=0.5, gated=True)
    cp = start_control_plane(apps=[hooks.spec])
    edges = [start_queue_edge(start_edge, cp, fresh_redis, shop()) for _ in range(2)]
    for i in range(60):  # one after another, alternating edges: this is the order
        status, _, _ = await send(client, edges[i % 2], f"evt_{i}", b'{"n": %d}' % i)
        assert status == 202
    hooks.open()
    deliveries = await delivered(hooks, 60, timeout=60)
    await asyncio.sleep(1)
    deliveries = hooks.deliveries()
    assert [json.loads(d["body"])["n"] for d in deliveries] == list(range(60))
    delivered_by = [
        metric_sum(edge.metrics(), "edge_queue_events_total", app="shop", event="delivered")
        for edge in edges
    ]
    assert sum(delivered_by) == 60


async def test_replayer_killed_mid_replay_is_taken_over_in_order(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, statuses="500")  # every delivery fails until fixed
    cp = start_control_plane(apps=[hooks.spec])
    app = shop()
    app["replay"] = replay_policy(max_attempts=100, claim_idle="6s")
    edges = [start_queue_edge(start_edge, cp, fresh_redis, app) for _ in range(2)]
    for i in range(5):
        status, _, _ = await send(client, edges[0], f"evt_{i}", b'{"n": %d}' % i)
        assert status == 202

    def retrying() -> list[int]:
        return [
            i
            for i, edge in enumerate(edges)
            if metric_sum(edge.metrics(), "edge_queue_events_total", app="shop", event="retried")
        ]

    await eventually(lambda: len(retrying()) == 1, timeout=30, what="one edge retrying")
    [holder] = retrying()
    os.killpg(edges[holder].proc.pid, signal.SIGKILL)
    edges[holder].proc.wait(5)
    edges[holder].stopped = True
    hooks.status_file.write_text("200")  # the app is fixed
    await delivered(hooks, 5, timeout=60)
    await asyncio.sleep(1)
    ok = [json.loads(d["body"])["n"] for d in hooks.successes()]
    assert ok == [0, 1, 2, 3, 4]  # the abandoned entry first, then the rest, each once
    survivor = edges[1 - holder]
    assert metric_sum(survivor.metrics(), "edge_queue_events_total", event="delivered") == 5


async def test_reload_that_adds_a_queue_rule_starts_queueing(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    hooks = WebhookApp(tmp_path, start_delay=2)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(rules=[]))
    status, headers, _ = await send(client, edge, "evt_before")
    assert status == 503 and headers["X-Edge-Error"] == "not_safe_to_hold"
    await asyncio.sleep(4)  # the wake that refusal started is over; let the app go to sleep
    config = dict(edge.config)
    config["apps"] = [shop(idle_timeout="1s")]
    edge.config_path.write_text(to_toml(config))
    edge.proc.send_signal(signal.SIGHUP)

    async def asleep() -> bool:
        _, listing = await admin(client, edge, "GET", "/admin/apps")
        return listing["apps"][0]["state"] in ("sleeping", "cold")

    await eventually(asleep, timeout=30, interval=0.3, what="the app asleep (1 s idle timeout)")
    status, _, body = await send(client, edge, "evt_after")
    assert status == 202, body
    await delivered(hooks, 1)
    assert [d["queued_id"] for d in hooks.deliveries()] == [json.loads(body)["queued_id"]]


async def test_a_webhook_after_the_edge_sleeps_the_app_is_queued_not_sent_to_the_drained(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    """The edge stores "sleeping" before the control plane has the allocation draining
    (here the control plane is frozen mid-drain, so the route table still lists the
    allocation ready): a webhook sent then is queued (202) and replayed once to a new
    allocation, never forwarded to the one being put to drain."""
    hooks = WebhookApp(tmp_path, start_delay=0.2)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(idle_timeout="2s"))
    status, _, first = await send(client, edge, "evt_0")
    assert status == 202, first
    await delivered(hooks, 1)
    cp.pause()  # before the 2 s idle timeout ends: the sleep's drain waits on it
    try:

        async def sleeping() -> bool:
            _, listing = await admin(client, edge, "GET", "/admin/apps")
            return listing["apps"][0]["state"] == "sleeping"

        await eventually(sleeping, timeout=20, interval=0.1, what="the app sleeping")
        status, _, body = await send(client, edge, "evt_1")
        assert status == 202, body  # before: 200, forwarded to the allocation put to drain
    finally:
        cp.resume()
    await delivered(hooks, 2, timeout=60)
    await asyncio.sleep(1)
    deliveries = hooks.deliveries()
    assert [d["queued_id"] for d in deliveries] == [
        json.loads(first)["queued_id"],
        json.loads(body)["queued_id"],
    ]
    assert len({d["instance"] for d in deliveries}) == 2  # the second woke a new one


async def test_a_stalled_upload_is_408_and_gives_back_what_it_reserved(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    from helpers import connect, read_response
    from helpers import send as send_raw

    hooks = WebhookApp(tmp_path, start_delay=30)
    cp = start_control_plane(apps=[hooks.spec])
    edge = start_edge(
        apps=[shop(max_held=2)],
        edge={"store": fresh_redis},
        upstream={"idle_timeout": "1s"},
        sections={"control_plane": {"url": cp.url}},
        env={"CONTROL_PLANE_TOKEN": CONTROL_PLANE_TOKEN},
    )
    for _ in range(3):  # more stalls than the app's max_held: each one must give back
        reader, writer = await connect(edge.port)
        head = (
            "POST /hooks/pay HTTP/1.1\r\nHost: shop.localhost\r\nX-Event-Id: evt_stall\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        await send_raw(writer, head.encode() + b"x" * 10)
        response = await read_response(reader)
        assert response.status == 408
        writer.close()
    status, _, _ = await send(client, edge, "evt_after")
    assert status == 202  # not 503 hold_cap: nothing leaked
    _, overview = await admin(client, edge, "GET", "/admin/queues")
    assert overview["queues"][0]["queued"] == 1


async def test_hash_dedupe_never_merges_two_senders(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    """Issue 12: `dedupe_key = "hash"` covers who sent the request (Authorization and the
    policy's identity_headers), so two senders of one body get two deliveries."""
    hooks = WebhookApp(tmp_path, start_delay=2)
    cp = start_control_plane(apps=[hooks.spec])
    app = shop()
    app["replay"] = replay_policy(dedupe_key="hash")
    edge = start_queue_edge(start_edge, cp, fresh_redis, app)
    body = b'{"transfer": 100}'

    async def post(headers: dict[str, str]) -> dict[str, Any]:
        async with client.post(
            edge.url + "/hooks/pay", data=body, headers={"Host": HOST, **headers}
        ) as resp:
            assert resp.status == 202
            return await resp.json()

    alice = await post({"Authorization": "Bearer alice"})
    bob = await post({"Authorization": "Bearer bob"})
    carol = await post({"Authorization": "Bearer alice", "X-Api-Key": "carol"})
    assert not bob["duplicate"] and bob["queued_id"] != alice["queued_id"]
    assert not carol["duplicate"] and carol["queued_id"] not in (
        alice["queued_id"],
        bob["queued_id"],
    )
    again = await post({"Authorization": "Bearer alice"})  # a real resend is still one
    assert again == {**alice, "duplicate": True}
    await delivered(hooks, 3)
    await asyncio.sleep(1)
    signed = sorted(d["queued_id"] for d in hooks.deliveries())
    assert signed == sorted(x["queued_id"] for x in (alice, bob, carol))


async def test_dead_letters_beyond_the_cap_are_counted_and_logged(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    """Issue 12: max_dead_letters drops the oldest dead letters, never silently."""
    hooks = WebhookApp(tmp_path, statuses="400", start_delay=0.5)
    cp = start_control_plane(apps=[hooks.spec])
    app = shop()
    app["replay"] = replay_policy(max_dead_letters=2)
    edge = start_queue_edge(start_edge, cp, fresh_redis, app)
    answers = [json.loads((await send(client, edge, f"evt_{i}"))[2]) for i in range(4)]

    def trimmed() -> float:
        return metric_sum(
            edge.metrics(), "edge_queue_events_total", app="shop", event="dead_letter_trimmed"
        )

    await eventually(lambda: trimmed() == 2, timeout=30, what="two dead letters trimmed")
    assert metric_sum(edge.metrics(), "edge_queue_dead_letters", app="shop") == 2
    await eventually(
        lambda: all(a["queued_id"] in edge.output() for a in answers[:2]),
        timeout=5,
        what="the trimmed dead letters' ids in the log",
    )
    assert "max_dead_letters" in edge.output()


RAW_UPSTREAM = Path(__file__).parent / "raw_upstream.py"


async def test_a_101_answer_is_dead_lettered_and_the_queue_moves_on(
    start_control_plane, start_edge, fresh_redis, client, tmp_path
) -> None:
    """Issue 12: an app that answers a queued request with 101 gave its final answer: the
    entry is dead-lettered once (the reason says why), and the next entry is delivered."""
    spec = sample_app_spec("shop")
    spec["command"] = ["{python}", str(RAW_UPSTREAM), "--port", "{port}", "--name", "{allocation}"]
    spec["artifact"] = str(RAW_UPSTREAM)
    cp = start_control_plane(apps=[spec])
    rules = [{"class": "queue", "methods": ["POST"], "path_prefix": "/"}]
    edge = start_queue_edge(start_edge, cp, fresh_redis, shop(rules=rules), admin_token="t")
    queued = []
    for path in ("/tunnel?id=replayed", "/echo"):
        status, _, body = await send(client, edge, "", b'{"path": "%b"}' % path.encode(), path)
        assert status == 202, body
        queued.append(json.loads(body)["queued_id"])

    async def dead() -> list[dict[str, Any]]:
        return (await admin(client, edge, "GET", "/admin/queues/shop/dead"))[1]["dead"]

    await eventually(dead, timeout=30, interval=0.2, what="the 101 answer dead-lettered")
    [letter] = await dead()
    assert (letter["queued_id"], letter["status"], letter["attempts"]) == (queued[0], 101, 1)
    assert "101" in letter["reason"] and "switched protocols" in letter["reason"]

    async def app_log() -> list[dict[str, Any]]:
        async with client.get(edge.url + "/__stats", headers={"Host": HOST}) as resp:
            return (await resp.json())["log"]

    def queued_id(entry: dict[str, Any]) -> str:
        return next((v for k, v in entry["headers"] if k == "X-Edge-Queued-Id"), "")

    async def echo_delivered() -> bool:
        return any(queued_id(e) == queued[1] for e in await app_log())

    await eventually(echo_delivered, timeout=15, interval=0.2, what="the next entry delivered")
    await asyncio.sleep(1.5)  # a scan or more later: the 101 was not sent again
    tunnels = [e for e in await app_log() if e["path"].startswith("/tunnel")]
    assert len(tunnels) == 1
    _, overview = await admin(client, edge, "GET", "/admin/queues")
    assert overview["queues"] == [{"app": "shop", "queued": 0, "dead_letters": 1}]
