"""The replay-policy keys added for issue 12: identity_headers (what a hashed key covers)."""

from __future__ import annotations

import pytest

from edge.queue.replay_policy import DEFAULT_IDENTITY_HEADERS
from edge.server.config import ConfigError, load_config_text

FILE = "edge.toml"
BASE = """
[edge]
store = "redis://127.0.0.1:6379/0"

[control_plane]
url = "http://127.0.0.1:7070"

[[apps]]
name = "shop"
hosts = ["shop.localhost"]
scale_to_zero = true
rules = [{class = "queue", methods = ["POST"]}]

[apps.replay]
max_attempts = 5
retention = "24h"
dedupe_key = "hash"
max_body = "1MiB"
"""


def test_identity_headers_default_and_override() -> None:
    replay = load_config_text(BASE, FILE).apps[0].replay
    assert replay is not None and replay.identity_headers == list(DEFAULT_IDENTITY_HEADERS)
    replay = load_config_text(BASE + 'identity_headers = ["X-Tenant"]\n', FILE).apps[0].replay
    assert replay is not None and replay.identity_headers == ["X-Tenant"]


@pytest.mark.parametrize("value", ['["Bad Name"]', '[""]', '["X-A:b"]'])
def test_identity_headers_must_be_header_names(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + f"identity_headers = {value}\n", FILE)
    assert info.value.path == "apps[0].replay.identity_headers[0]"
