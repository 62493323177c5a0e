"""The front's own config keys ([edge] client identity fields, [limits] pipelining and body
rate, response heads): defaults, validation, and what the worker makes of them."""

from __future__ import annotations

import pytest

from edge.http.forward_headers import DEFAULT_CLIENT_IDENTITY_HEADERS
from edge.server.config import ConfigError, load_config_text

FILE = "front-test.toml"
APP = '[[apps]]\nname = "a"\nhosts = ["a.localhost"]\nupstreams = ["127.0.0.1:1"]\n'


def error_path(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, FILE)
    return info.value.path


def test_client_identity_headers_default_and_replace() -> None:
    assert load_config_text(APP, FILE).edge.client_identity_headers == list(
        DEFAULT_CLIENT_IDENTITY_HEADERS
    )
    config = load_config_text('[edge]\nclient_identity_headers = ["X-Tenant-IP"]\n' + APP, FILE)
    assert config.edge.client_identity_headers == ["X-Tenant-IP"]


@pytest.mark.parametrize("name", ["X Real", "X-Forwarded-For", "host", "Content-Length", ""])
def test_client_identity_headers_must_be_plain_field_names(name: str) -> None:
    text = f'[edge]\nclient_identity_headers = ["X-Ok", "{name}"]\n' + APP
    assert error_path(text) == "edge.client_identity_headers[1]"


def test_max_pipelined_default_and_bounds() -> None:
    assert load_config_text(APP, FILE).limits.max_pipelined == 16
    assert load_config_text("[limits]\nmax_pipelined = 2\n" + APP, FILE).limits.max_pipelined == 2
    assert error_path("[limits]\nmax_pipelined = 0\n" + APP) == "limits.max_pipelined"


def test_body_rate_defaults_and_units() -> None:
    limits = load_config_text(APP, FILE).limits
    assert (limits.min_body_rate, limits.body_rate_grace) == (1024, 5.0)
    text = '[limits]\nmin_body_rate = "10KiB"\nbody_rate_grace = "2s"\n' + APP
    limits = load_config_text(text, FILE).limits
    assert (limits.min_body_rate, limits.body_rate_grace) == (10 * 1024, 2.0)
    off = load_config_text("[limits]\nmin_body_rate = 0\n" + APP, FILE).limits
    assert off.min_body_rate == 0


def test_max_response_head_default_and_units() -> None:
    assert load_config_text(APP, FILE).limits.max_response_head == 64 * 1024
    text = '[limits]\nmax_response_head = "1MiB"\n' + APP
    assert load_config_text(text, FILE).limits.max_response_head == 1024 * 1024
    assert error_path("[limits]\nmax_response_head = 0\n" + APP) == "limits.max_response_head"
