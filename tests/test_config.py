"""edge.server.config: strict TOML decoding, one clear error per problem, and `edge check`."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, run_edge_cli

from edge.server.config import ConfigError, effective_config, load_config, load_config_text
from scheduler_client.config_file import parse_duration, parse_size, render_toml

FILE = "edge-test.toml"

APP = """
[[apps]]
name = "hello"
hosts = ["hello.localhost"]
upstreams = ["127.0.0.1:9001"]
"""


def app(name: str = "a", hosts: str = '["a.localhost"]', upstreams: str = '["127.0.0.1:1"]') -> str:
    return f'[[apps]]\nname = "{name}"\nhosts = {hosts}\nupstreams = {upstreams}\n'


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, FILE)
    err = info.value
    message = str(err)
    assert message.startswith(f"{FILE}: "), message
    assert err.problem and err.problem in message
    if err.path:
        assert f"{FILE}: {err.path}: " in message
    return err


def test_minimal_config_fills_defaults() -> None:
    config = load_config_text(APP, FILE)
    assert config.edge.listen == "127.0.0.1:8080"
    assert config.edge.admin_listen == "127.0.0.1:9090"
    assert config.edge.workers == 1
    assert config.edge.store == "memory://"
    assert config.limits.max_body == 100 * 1024 * 1024
    assert config.limits.header_timeout == 10.0
    assert [app.name for app in config.apps] == ["hello"]
    assert config.apps[0].upstreams == ["127.0.0.1:9001"]


def test_full_config_with_units() -> None:
    config = load_config_text(
        """
[edge]
listen = "127.0.0.1:18080"
admin_listen = "[::1]:19090"
workers = 4
store = "redis://127.0.0.1:6379/0"
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
access_log = "/tmp/access.log"
access_log_sample = 0.25
shutdown_timeout = "1m30s"

[limits]
max_request_line = "4KiB"
max_header_bytes = "1MB"
max_headers = 50
max_body = "2GiB"
header_timeout = "250ms"
keepalive_timeout = "2h"
max_connections = 5

[upstream]
connect_timeout = "1.5s"
response_header_timeout = "30s"
idle_timeout = "1m"
keepalive_idle = "10s"
max_idle_per_upstream = 8

[[apps]]
name = "shop"
hosts = ["shop.example.com", "*.shop.example.com"]
upstreams = ["127.0.0.1:9001", "[::1]:9002"]
""",
        FILE,
    )
    assert config.edge.workers == 4
    assert config.edge.shutdown_timeout == 90.0
    assert config.limits.max_request_line == 4096
    assert config.limits.max_header_bytes == 1_000_000
    assert config.limits.max_body == 2 * 1024**3
    assert config.limits.header_timeout == 0.25
    assert config.limits.keepalive_timeout == 7200.0
    assert config.upstream.connect_timeout == 1.5
    assert config.upstream.idle_timeout == 60.0
    assert config.apps[0].hosts == ["shop.example.com", "*.shop.example.com"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("1m30s", 90.0), ("2h", 7200.0), ("0s", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "5", "s", "-1s", "5 s", "1m 30s", "5S", "five"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        (512, 512),
        ("0", 0),
        ("10B", 10),
        ("64KiB", 65536),
        ("64KB", 64000),
        ("1MiB", 1048576),
        ("2GB", 2_000_000_000),
        ("1GiB", 1024**3),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1QB", "1.5MiB", "-1", "MiB", "", "1 M", -5, True, 1.5])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "path", "key"),
    [
        ("bogus = 1\n" + APP, "", "bogus"),
        ("[edge]\nlisten_port = 8080\n" + APP, "edge", "listen_port"),
        ("[limits]\nmax_body_size = '1MiB'\n" + APP, "limits", "max_body_size"),
        ("[upstream]\ntimeout = '5s'\n" + APP, "upstream", "timeout"),
        (APP + "weight = 3\n", "apps[0]", "weight"),
        ("[edge.tls]\ncert_file = 'a'\nkey_file = 'b'\nca = 'c'\n" + APP, "edge.tls", "ca"),
        ("[route]\nx = 1\n" + APP, "", "route"),
    ],
)
def test_unknown_keys(text: str, path: str, key: str) -> None:
    err = config_error(text)
    assert err.path == path
    assert key in err.problem


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[edge]\nworkers = "2"\n' + APP, "edge.workers"),
        ("[edge]\nlisten = 8080\n" + APP, "edge.listen"),
        ("[edge]\ntrusted_proxies = '10.0.0.0/8'\n" + APP, "edge.trusted_proxies"),
        ("[limits]\nmax_headers = 'many'\n" + APP, "limits.max_headers"),
        ("[limits]\nheader_timeout = 5\n" + APP, "limits.header_timeout"),
        ("[limits]\nmax_body = 1.5\n" + APP, "limits.max_body"),
        (
            '[[apps]]\nname = "a"\nhosts = "a.localhost"\nupstreams = ["127.0.0.1:1"]\n',
            "apps[0].hosts",
        ),
        ("edge = 1\n" + APP, "edge"),
        ("apps = 'hello'\n", "apps"),
    ],
)
def test_wrong_types(text: str, path: str) -> None:
    assert config_error(text).path == path


@pytest.mark.parametrize(
    ("text", "path", "bad"),
    [
        ('[limits]\nheader_timeout = "5x"\n' + APP, "limits.header_timeout", "5x"),
        ('[upstream]\nconnect_timeout = "fast"\n' + APP, "upstream.connect_timeout", "fast"),
        ('[limits]\nmax_body = "1QB"\n' + APP, "limits.max_body", "1QB"),
        ('[limits]\nmax_header_bytes = "lots"\n' + APP, "limits.max_header_bytes", "lots"),
    ],
)
def test_bad_durations_and_sizes(text: str, path: str, bad: str) -> None:
    err = config_error(text)
    assert err.path == path
    assert bad in err.problem


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[limits]\nheader_timeout = "0s"\n' + APP, "limits.header_timeout"),
        ('[upstream]\nresponse_header_timeout = "0ms"\n' + APP, "upstream.response_header_timeout"),
        ("[limits]\nmax_connections = 0\n" + APP, "limits.max_connections"),
        ("[limits]\nmax_headers = 0\n" + APP, "limits.max_headers"),
        ("[edge]\nworkers = 0\n" + APP, "edge.workers"),
        ("[edge]\naccess_log_sample = 1.5\n" + APP, "edge.access_log_sample"),
        ("[edge]\ntrusted_proxies = ['10.0.0.0/33']\n" + APP, "edge.trusted_proxies[0]"),
        ("[edge]\ntrusted_proxies = ['not-a-cidr']\n" + APP, "edge.trusted_proxies[0]"),
        ('[edge]\nstore = "mysql://db"\n' + APP, "edge.store"),
        ("[upstream]\nmax_idle_per_upstream = -1\n" + APP, "upstream.max_idle_per_upstream"),
        ("[limits]\nmax_request_line = 0\n" + APP, "limits.max_request_line"),
        ("[control_plane]\nretries = 11\n" + APP, "control_plane.retries"),
        ('[control_plane]\ntimeout = "0s"\n' + APP, "control_plane.timeout"),
        ("[budget]\nmax_concurrent_wakes = 0\n" + APP, "budget.max_concurrent_wakes"),
        ("[budget]\nmax_wakes_per_second = 0\n" + APP, "budget.max_wakes_per_second"),
        ('[budget]\nwake_lease_ttl = "100ms"\n' + APP, "budget.wake_lease_ttl"),
        ('[budget]\nwake_slot_ttl = "0s"\n' + APP, "budget.wake_slot_ttl"),
        ("[hold]\nmax_held = -1\n" + APP, "hold.max_held"),
        (APP + 'hold_timeout = "0s"\n', "apps[0].hold_timeout"),
        (APP + "max_held = -1\n", "apps[0].max_held"),
    ],
)
def test_out_of_range_values(text: str, path: str) -> None:
    assert config_error(text).path == path


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ("[edge]\nworkers = 0\n" + APP, "edge.workers", "Expected `int` >= 1, got 0"),
        (
            "[edge]\naccess_log_sample = 1.5\n" + APP,
            "edge.access_log_sample",
            "Expected `float` <= 1.0, got 1.5",
        ),
        (
            '[limits]\nheader_timeout = "0ms"\n' + APP,
            "limits.header_timeout",
            "Expected a duration > 0s, got '0ms'",
        ),
        (
            '[budget]\nwake_slot_ttl = "100ms"\n' + APP,
            "budget.wake_slot_ttl",
            "Expected a duration >= 500ms, got '100ms'",
        ),
        (
            "[limits]\nmax_header_bytes = 0\n" + APP,
            "limits.max_header_bytes",
            "Expected a size >= 1, got 0",
        ),
    ],
)
def test_bound_errors_say_the_bound_and_the_value(text: str, path: str, problem: str) -> None:
    # The bounds sit on the fields; msgspec (or the duration/size hook) reports them.
    err = config_error(text)
    assert (err.path, err.problem) == (path, problem)


def test_wake_slot_ttl_reaches_the_budget_limits() -> None:
    from edge.server.worker_context import budget_limits

    assert budget_limits(load_config_text(APP, FILE)).slot_ttl == 30.0
    config = load_config_text('[budget]\nwake_slot_ttl = "45s"\n' + APP, FILE)
    assert config.budget.wake_slot_ttl == 45.0
    assert budget_limits(config).slot_ttl == 45.0


@pytest.mark.parametrize(
    ("text", "path", "given"),
    [
        ('[log]\nlevel = "loud"\n' + APP, "log.level", "'loud'"),
        ('[log]\nlevel = "DEBUG"\n' + APP, "log.level", "'DEBUG'"),
        ('[log]\nformat = "xml"\n' + APP, "log.format", "'xml'"),
        ("[log]\nlevel = 10\n" + APP, "log.level", "int"),
        ('[log]\ndestination = "syslog"\n' + APP, "log", "destination"),
    ],
)
def test_bad_log_settings(text: str, path: str, given: str) -> None:
    err = config_error(text)
    assert err.path == path
    assert given in err.problem


def test_bad_log_level_names_the_levels() -> None:
    err = config_error('[log]\nlevel = "loud"\n' + APP)
    for level in ("debug", "info", "warning", "error"):
        assert repr(level) in err.problem


def test_log_settings_load() -> None:
    assert load_config_text(APP, FILE).log.level == "info"
    config = load_config_text('[log]\nlevel = "debug"\nformat = "json"\n' + APP, FILE)
    assert (config.log.level, config.log.format) == ("debug", "json")


@pytest.mark.parametrize(
    "hosts",
    [
        ('["a.localhost"]', '["A.LOCALHOST"]'),
        ('["a.localhost"]', '["a.localhost."]'),
        ('["*.example.com"]', '["*.Example.COM"]'),
    ],
)
def test_duplicate_hosts_across_apps_case_insensitive(hosts: tuple[str, str]) -> None:
    text = "".join(
        f'[[apps]]\nname = "app{i}"\nhosts = {h}\nupstreams = ["127.0.0.1:900{i}"]\n'
        for i, h in enumerate(hosts)
    )
    err = config_error(text)
    assert err.path == "apps[1].hosts[0]"
    assert "duplicate" in err.problem
    assert "app0" in err.problem


def test_duplicate_host_within_one_app() -> None:
    err = config_error(app(hosts='["x.localhost", "X.localhost"]'))
    assert err.path == "apps[0].hosts[1]"
    assert "duplicate" in err.problem


def test_exact_and_wildcard_for_same_domain_are_not_duplicates() -> None:
    config = load_config_text(
        '[[apps]]\nname = "a"\nhosts = ["example.com"]\nupstreams = ["127.0.0.1:1"]\n'
        '[[apps]]\nname = "b"\nhosts = ["*.example.com"]\nupstreams = ["127.0.0.1:2"]\n',
        FILE,
    )
    assert [app.name for app in config.apps] == ["a", "b"]


@pytest.mark.parametrize(
    "app",
    [
        '[[apps]]\nname = "lonely"\nhosts = ["lonely.localhost"]\nupstreams = []\n',
        '[[apps]]\nname = "lonely"\nhosts = ["lonely.localhost"]\n',
    ],
)
def test_app_without_upstream(app: str) -> None:
    err = config_error(app)
    assert err.path == "apps[0].upstreams"
    assert "lonely" in err.problem
    assert "upstream" in err.problem


def test_app_without_hosts() -> None:
    err = config_error('[[apps]]\nname = "a"\nhosts = []\nupstreams = ["127.0.0.1:1"]\n')
    assert err.path == "apps[0].hosts"


def test_app_missing_required_name() -> None:
    err = config_error('[[apps]]\nhosts = ["a.localhost"]\nupstreams = ["127.0.0.1:1"]\n')
    assert err.path == "apps[0]"
    assert "name" in err.problem


def test_duplicate_app_names() -> None:
    err = config_error(
        APP + '[[apps]]\nname = "hello"\nhosts = ["other.localhost"]\nupstreams = ["127.0.0.1:2"]\n'
    )
    assert err.path == "apps[1].name"
    assert "hello" in err.problem


@pytest.mark.parametrize("name", ["Hello", "has space", "-lead", "", "x" * 64])
def test_bad_app_name(name: str) -> None:
    err = config_error(
        f'[[apps]]\nname = "{name}"\nhosts = ["a.localhost"]\nupstreams = ["127.0.0.1:1"]\n'
    )
    assert err.path == "apps[0].name"


@pytest.mark.parametrize("pattern", ["foo.*.com", "*", "a b.localhost", "host:8080"])
def test_bad_host_pattern(pattern: str) -> None:
    err = config_error(
        f'[[apps]]\nname = "a"\nhosts = ["{pattern}"]\nupstreams = ["127.0.0.1:1"]\n'
    )
    assert err.path == "apps[0].hosts[0]"


@pytest.mark.parametrize("key", ["listen", "admin_listen"])
@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http"],
)
def test_bad_listen_address(key: str, address: str) -> None:
    err = config_error(f'[edge]\n{key} = "{address}"\n' + APP)
    assert err.path == f"edge.{key}"


@pytest.mark.parametrize("address", ["not an address:8080", "exa mple.com:80", "[::1:8080"])
def test_listen_host_must_be_an_address_or_name(address: str) -> None:
    # A host part that can never be bound is a config error, not a crash at bind time.
    err = config_error(f'[edge]\nlisten = "{address}"\n' + APP)
    assert err.path == "edge.listen"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:99999", "host:port"])
def test_bad_upstream_address(address: str) -> None:
    err = config_error(
        f'[[apps]]\nname = "a"\nhosts = ["a.localhost"]\nupstreams = ["{address}"]\n'
    )
    assert err.path == "apps[0].upstreams[0]"


@pytest.mark.parametrize("address", ["0.0.0.0:9090", "10.1.2.3:9090", "[::]:9090"])
def test_admin_off_loopback_requires_token(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.delenv("EDGE_ADMIN_TOKEN", raising=False)
    err = config_error(f'[edge]\nadmin_listen = "{address}"\n' + APP)
    assert "token" in err.problem


@pytest.mark.parametrize("address", ["127.0.0.1:9090", "[::1]:9090", "localhost:9090"])
def test_admin_on_loopback_needs_no_token(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.delenv("EDGE_ADMIN_TOKEN", raising=False)
    config = load_config_text(f'[edge]\nadmin_listen = "{address}"\n' + APP, FILE)
    assert config.edge.admin_listen == address


def test_admin_token_from_config_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_ADMIN_TOKEN", raising=False)
    text = '[edge]\nadmin_listen = "0.0.0.0:9090"\n'
    assert load_config_text(text + 'admin_token = "s3cret"\n' + APP, FILE)
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", "from-env")
    assert load_config_text(text + APP, FILE)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    err = config_error(f'[edge.tls]\ncert_file = "{missing}"\nkey_file = "{missing}"\n' + APP)
    assert err.path == "edge.tls.cert_file"
    assert str(missing) in err.problem


def test_invalid_toml_names_the_file() -> None:
    err = config_error("[edge\nlisten = ")
    assert "TOML" in err.problem


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(APP)
    assert load_config(path).apps[0].name == "hello"


def test_load_config_error_names_the_real_file(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[limits]\nmax_body = "1QB"\n' + APP)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: limits.max_body: ")


def test_effective_config_has_every_default_and_round_trips() -> None:
    config = load_config_text(APP, FILE)
    data = effective_config(config)
    assert data["limits"]["max_connections"] == 10_000
    assert data["edge"]["admin_listen"] == "127.0.0.1:9090"
    text = render_toml(data)
    for line in ("[edge]", "[limits]", "[upstream]", "[[apps]]", "max_connections = 10000"):
        assert line in text
    # What `edge check` prints is itself a valid config meaning the same thing.
    assert load_config_text(text, "<effective>") == config


# --------------------------------------------------------------------------- edge check (CLI)


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path, APP)
    result = run_edge_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("hello.localhost", "127.0.0.1:9001", "max_connections", "header_timeout"):
        assert needle in out, f"{needle!r} missing from `edge check` output:\n{out}"


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ("[edge]\nbogus = 1\n" + APP, "edge", "bogus"),
        ('[limits]\nheader_timeout = "5x"\n' + APP, "limits.header_timeout", "5x"),
        ('[limits]\nmax_body = "1QB"\n' + APP, "limits.max_body", "1QB"),
        ('[edge]\nworkers = "two"\n' + APP, "edge.workers", "int"),
        (APP + APP.replace('"hello"', '"other"'), "apps[1].hosts[0]", "duplicate"),
        ('[[apps]]\nname = "a"\nhosts = ["a.localhost"]\n', "apps[0].upstreams", "upstream"),
        ('[edge]\nlisten = "127.0.0.1"\n' + APP, "edge.listen", "127.0.0.1"),
    ],
)
def test_check_rejects_with_exit_2(tmp_path: Path, text: str, path: str, problem: str) -> None:
    config_path = write(tmp_path, text)
    result = run_edge_cli("check", str(config_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    message = result.stderr + result.stdout
    assert str(config_path) in message
    assert path in message
    assert problem in message
    assert "Traceback" not in message


def test_check_missing_file_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_edge_cli("check", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------- queue and replay gate

COLD_APP = """
[control_plane]
url = "http://127.0.0.1:1"

[[apps]]
name = "shop"
hosts = ["shop.localhost"]
scale_to_zero = true
"""
QUEUE_RULE = """
[[apps.rules]]
class = "queue"
methods = ["POST"]
path_prefix = "/hooks/"
"""
REPLAY = """
[apps.replay]
max_attempts = 5
retention = "24h"
dedupe_key = "header:X-Event-Id"
max_body = "1MiB"
"""
REDIS = '[edge]\nstore = "redis://127.0.0.1:6379/0"\n'


def test_queue_with_a_replay_policy_loads() -> None:
    config = load_config_text(REDIS + COLD_APP + QUEUE_RULE + REPLAY, FILE)
    replay = config.apps[0].replay
    assert replay is not None
    assert (replay.max_attempts, replay.retention, replay.max_body) == (5, 86400.0, 1024 * 1024)
    assert replay.dedupe_key == "header:X-Event-Id"
    assert replay.claim_idle > replay.attempt_timeout


def test_queue_with_the_memory_store_is_refused() -> None:
    err = config_error(COLD_APP + QUEUE_RULE + REPLAY)
    assert err.path == "apps[0].rules[0].class"
    assert "would lose queued requests on restart" in err.problem


def test_queue_from_shared_rules_with_the_memory_store_is_refused() -> None:
    shared = '[[classification]]\nclass = "queue"\nmethods = ["POST"]\n'
    err = config_error(shared + COLD_APP + REPLAY)
    assert err.path == "classification[0].class"


def test_queue_without_a_replay_policy_is_refused() -> None:
    err = config_error(REDIS + COLD_APP + QUEUE_RULE)
    assert err.path == "apps[0].replay"
    assert "no replay policy" in err.problem
    shared = '[[classification]]\nclass = "queue"\nheader = "X-Signature"\n'
    assert config_error(REDIS + shared + COLD_APP).path == "apps[0].replay"


def test_replay_policy_needs_its_four_decisions() -> None:
    for key in ("max_attempts", "retention", "dedupe_key", "max_body"):
        lines = [line for line in REPLAY.splitlines() if not line.startswith(key)]
        err = config_error(REDIS + COLD_APP + QUEUE_RULE + "\n".join(lines) + "\n")
        assert key in str(err)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("max_attempts = 0", "max_attempts"),
        ('dedupe_key = "body"', "dedupe_key"),
        ('dedupe_key = "header:"', "dedupe_key"),
        ('dedupe_key = "header:Bad Name"', "dedupe_key"),
        ('max_body = "200MiB"', "max_body"),
        ("max_body = 0", "max_body"),
        ("max_attempts = 101", "max_attempts"),
        ('attempt_timeout = "0s"', "attempt_timeout"),
        ("max_dead_letters = 0", "max_dead_letters"),
        ('retention = "0s"', "retention"),
        ('claim_idle = "10s"', "claim_idle"),
        ('backoff_max = "1ms"', "backoff_max"),
        ("max_queued = 0", "max_queued"),
    ],
)
def test_bad_replay_policy(line: str, key: str) -> None:
    name = line.split(" ")[0]
    lines = [entry for entry in REPLAY.splitlines() if not entry.startswith(name)] + [line]
    err = config_error(REDIS + COLD_APP + QUEUE_RULE + "\n".join(lines) + "\n")
    assert err.path == f"apps[0].replay.{key}"


def test_check_warns_when_redis_has_no_aof(tmp_path: Path, own_redis) -> None:
    text = f'[edge]\nstore = "{own_redis.url}"\n' + COLD_APP + QUEUE_RULE + REPLAY
    path = write(tmp_path, text)
    with_aof = run_edge_cli("check", str(path))
    assert with_aof.returncode == 0, with_aof.stderr
    assert "warning" not in with_aof.stderr
    import redis

    client = redis.Redis(port=own_redis.port)
    client.config_set("appendonly", "no")
    client.close()
    without = run_edge_cli("check", str(path))
    assert without.returncode == 0, without.stderr
    assert "warning" in without.stderr and "no AOF persistence" in without.stderr
    assert "shop" in without.stderr
    own_redis.stop()
    down = run_edge_cli("check", str(path))
    assert down.returncode == 0 and "could not check Redis persistence" in down.stderr


def test_shipped_configs_load() -> None:
    from edge.server.config import replay_apps

    production = load_config(ROOT / "configs" / "production.example.toml")
    assert list(replay_apps(production)) == ["payments"]
    assert load_config(ROOT / "configs" / "local.toml").apps


def test_replay_policy_with_the_memory_store_is_refused() -> None:
    err = config_error(COLD_APP + REPLAY)
    assert err.path == "apps[0].replay" and "redis://" in err.problem


def test_replay_max_body_above_the_held_body_caps_is_refused() -> None:
    big = REPLAY.replace('max_body = "1MiB"', 'max_body = "16MiB"')
    err = config_error(REDIS + COLD_APP + QUEUE_RULE + big)
    assert err.path == "apps[0].replay.max_body" and "held-body cap" in err.problem


# --------------------------------------------------------------------------- max_concurrency


def test_max_concurrency_and_release_ramp_load() -> None:
    from edge.routing.app_upstreams import concurrency_limit
    from edge.routing.concurrency_limit import ConcurrencyLimit, ReleaseRamp

    plain = load_config_text(APP, FILE).apps[0]
    assert plain.max_concurrency is None and plain.ramp() is None
    assert concurrency_limit(plain, 4) is None  # unset: no limit at all
    limited = load_config_text(APP + "max_concurrency = 9\n", FILE).apps[0]
    assert concurrency_limit(limited, 1) == ConcurrencyLimit(9)
    assert concurrency_limit(limited, 2) == ConcurrencyLimit(5)  # ceil(9 / 2)
    assert concurrency_limit(limited, 16) == ConcurrencyLimit(1)
    ramped = load_config_text(COLD_APP + "max_concurrency = 8\nrelease_ramp = true\n", FILE)
    assert concurrency_limit(ramped.apps[0], 1) == ConcurrencyLimit(8, ReleaseRamp(0.25, 1.0))
    table = 'release_ramp = {start = 0.5, double_every = "250ms"}\n'
    tuned = load_config_text(COLD_APP + "max_concurrency = 8\n" + table, FILE).apps[0]
    assert concurrency_limit(tuned, 2) == ConcurrencyLimit(4, ReleaseRamp(0.5, 0.25))
    # What `edge check` prints loads back the same.
    for config in (ramped, load_config_text(COLD_APP + "max_concurrency = 8\n" + table)):
        assert load_config_text(render_toml(effective_config(config))) == config


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        (APP + "max_concurrency = 0\n", "apps[0].max_concurrency", "Expected `int` >= 1, got 0"),
        (APP + "max_concurrency = 2.5\n", "apps[0].max_concurrency", "Expected `int | null`"),
        (
            COLD_APP + "max_concurrency = 8\nrelease_ramp = {start = 0}\n",
            "apps[0].release_ramp.start",
            "Expected `float` > 0.0, got 0",
        ),
        (
            COLD_APP + "max_concurrency = 8\nrelease_ramp = {start = 2.0}\n",
            "apps[0].release_ramp.start",
            "Expected `float` <= 1.0, got 2.0",
        ),
        (
            COLD_APP + 'max_concurrency = 8\nrelease_ramp = {double_every = "0s"}\n',
            "apps[0].release_ramp.double_every",
            "Expected a duration > 0s, got '0s'",
        ),
        (
            COLD_APP + "release_ramp = true\n",
            "apps[0].release_ramp",
            "ramps max_concurrency up after a wake: set it too",
        ),
        (
            APP + "max_concurrency = 8\nrelease_ramp = true\n",
            "apps[0].release_ramp",
            "app 'hello' does not scale to zero: there is no wake to ramp after",
        ),
    ],
)
def test_bad_max_concurrency_and_release_ramp(text: str, path: str, problem: str) -> None:
    err = config_error(text)
    assert err.path == path and problem in err.problem, (err.path, err.problem)


# --------------------------------------------------------------- readiness_probe_interval


def test_readiness_probe_interval_loads_and_reaches_the_wake_spec() -> None:
    from edge.server.worker_context import wake_specs
    from wake import decisions

    default = load_config_text(COLD_APP, FILE)
    assert default.apps[0].readiness_probe_interval == decisions.PROBE_INTERVAL == 0.005
    tuned = load_config_text(COLD_APP + 'readiness_probe_interval = "20ms"\n', FILE)
    assert wake_specs(tuned)[tuned.apps[0].name].readiness_probe_interval == 0.02
    assert load_config_text(render_toml(effective_config(tuned))) == tuned


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('readiness_probe_interval = "0s"', "Expected a duration > 0s, got '0s'"),
        ('readiness_probe_interval = "0.5ms"', "use at least 1ms"),
        (
            'readiness_timeout = "1s"\nreadiness_probe_interval = "2s"',
            "2000ms: use at least 1ms (a probe is a connection to the starting app) and at "
            "most readiness_timeout",
        ),
    ],
)
def test_bad_readiness_probe_interval(line: str, problem: str) -> None:
    err = config_error(COLD_APP + line + "\n")
    assert err.path == "apps[0].readiness_probe_interval" and problem in err.problem, (
        err.path,
        err.problem,
    )
