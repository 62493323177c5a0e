"""Config files shared by the edge and the local control plane: TOML via msgspec, one error shape.

Durations ('250ms', '5s', '1m30s') and sizes ('64KiB', '1MiB') are typed, and every
problem becomes one `ConfigError` naming the file, the key path and what is wrong.
"""

from __future__ import annotations

import ipaddress
import json
import operator
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec

T = TypeVar("T")

_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?i){_LABEL}(\.{_LABEL})*\.?")


class ConfigError(Exception):
    """A config that cannot be used; the message names file, key path and problem."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file = file
        self.path = path
        self.problem = problem
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {problem}")


class Duration(float):
    """Seconds, written in config as '250ms', '5s', '1m30s', '2h'."""

    # msgspec.Meta bounds only the types msgspec decodes itself, not one decoded by a
    # hook: a subclass states its bounds here and the hook checks them while decoding.
    bounds: ClassVar[msgspec.Meta] = msgspec.Meta()


class ByteSize(int):
    """Bytes, written in config as '512', '64KiB', '1MiB', '2GB'."""

    bounds: ClassVar[msgspec.Meta] = msgspec.Meta()  # as for Duration


class PositiveDuration(Duration):
    """A duration above zero (a timeout, an interval)."""

    bounds = msgspec.Meta(gt=0)


class PositiveSize(ByteSize):
    """A size of at least one byte."""

    bounds = msgspec.Meta(ge=1)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(text: str) -> Duration:
    """'1m30s' -> 90.0; raises ValueError with the accepted forms."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a duration string like '5s' or '250ms', got {text!r}")
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit ms, s, m or h, e.g. '5s'"
        )
    return Duration(total)


def parse_size(text: str | int) -> ByteSize:
    """'64KiB' -> 65536; a bare integer is bytes."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like '64KiB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return ByteSize(text)
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: use bytes or a unit B, KB, KiB, MB, MiB, GB, GiB, e.g. '1MiB'"
        )
    return ByteSize(int(match.group(1)) * _SIZE_UNITS[match.group(2)])


_COMPARISONS = (
    ("gt", operator.gt, ">"),
    ("ge", operator.ge, ">="),
    ("lt", operator.lt, "<"),
    ("le", operator.le, "<="),
)


def _check_bounds(
    value: float, given: Any, bounds: msgspec.Meta, kind: str, show: Callable[[Any], str]
) -> None:
    """Raise ValueError (msgspec adds the key path) when `value` is outside `bounds`."""
    for name, holds, sign in _COMPARISONS:
        limit = getattr(bounds, name)
        if limit is not None and not holds(value, limit):
            raise ValueError(f"Expected {kind} {sign} {show(limit)}, got {given!r}")


def _dec_hook(kind: type, value: Any) -> Any:
    if issubclass(kind, Duration):
        seconds = parse_duration(value)
        _check_bounds(seconds, value, kind.bounds, "a duration", format_duration)
        return kind(seconds)
    if issubclass(kind, ByteSize):
        size = parse_size(value)
        _check_bounds(size, value, kind.bounds, "a size", format_size)
        return kind(size)
    raise NotImplementedError


def format_duration(seconds: float) -> str:
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    return f"{int(seconds)}s"


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, ByteSize):
        return format_size(value)
    raise NotImplementedError(type(value))


_PATH_IN_MESSAGE = re.compile(r"^(.*) - at `\$(.*)`$", re.DOTALL)


_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")
# msgspec's messages for a bound (`Expected `int` >= 1`) and a Literal name neither the
# value given nor the values allowed; both are added from the document and the type.
_BOUND_MESSAGE = re.compile(r"Expected `\w+` [<>]=? ")
_ENUM_MESSAGE = "Invalid enum value "
_MISSING = object()


def _split_validation_error(error: msgspec.ValidationError) -> tuple[str, str]:
    match = _PATH_IN_MESSAGE.match(str(error))
    if match is None:
        return "", str(error)
    return match.group(2).lstrip("."), match.group(1)


def _path_parts(path: str) -> list[str | int]:
    return [int(i) if i else key for key, i in _PATH_PART.findall(path)]


def _value_at(raw: Any, path: str) -> Any:
    for part in _path_parts(path):
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


def _type_at(kind: type, path: str) -> msgspec.inspect.Type | None:
    info: Any = msgspec.inspect.type_info(kind)
    for part in _path_parts(path):
        if isinstance(info, msgspec.inspect.UnionType):  # `Section | None`
            info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
        if isinstance(part, int) and isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        elif isinstance(part, str) and isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == part), None)
        else:
            return None
    return info


def _explain(problem: str, path: str, raw: Any, kind: type) -> str:
    if _BOUND_MESSAGE.match(problem) and ", got " not in problem:
        value = _value_at(raw, path)
        if value is not _MISSING:
            return f"{problem}, got {value!r}"
    if problem.startswith(_ENUM_MESSAGE):
        info = _type_at(kind, path)
        if isinstance(info, msgspec.inspect.LiteralType):
            allowed = ", ".join(repr(v) for v in info.values)
            return f"{problem}: expected one of {allowed}"
    return problem


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected 'host:port', got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), port
        except ValueError:
            raise ValueError(f"bad IPv6 address in {text!r}") from None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad host in {text!r}: use an IP address or a host name") from None
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_toml(text: str, file: str, kind: type[T]) -> T:
    """TOML text -> `kind`; raises ConfigError naming file, key path and problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"invalid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, kind, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        path, problem = _split_validation_error(exc)
        raise ConfigError(file, path, _explain(problem, path, raw, kind)) from None


def read_config_file(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None


def read_secret(env_name: str, file_name: str, file: str, key: str) -> str:
    """A secret from a file (when named) or an environment variable; ConfigError when absent."""
    import os

    if file_name:
        try:
            secret = Path(file_name).read_text().strip()
        except OSError as exc:
            raise ConfigError(file, f"{key}_file", f"cannot read: {exc.strerror}") from None
    else:
        secret = os.environ.get(env_name, "").strip()
    if not secret:
        where = file_name or f"the environment variable {env_name}"
        raise ConfigError(file, key, f"no {key}: set {where}")
    return secret


def to_builtins(config: Any) -> dict[str, Any]:
    """A config Struct as plain data, durations and sizes written back with units."""
    return msgspec.to_builtins(config, enc_hook=_enc_hook)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # inline table, e.g. classification rules inside an app
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(header: str, table: dict[str, Any], out: list[str]) -> None:
    """Plain keys first (None: left out), then sub-tables as [header.key]."""
    out.append(header)
    subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in table.items():
        if key not in subtables and value is not None:
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out.append("")
    name = header.strip("[]")
    for key, value in subtables.items():
        _toml_table(f"[{name}.{_toml_key(key)}]", value, out)


def render_toml(data: dict[str, Any], comment: str = "") -> str:
    """Config as TOML text: tables and arrays of tables (each with sub-tables), under an
    optional comment (`edge check` prints it; the demo, tests and benchmarks write it)."""
    out = [f"# {line}" if line else "#" for line in comment.splitlines()]
    if out:
        out.append("")
    for key, value in data.items():
        if isinstance(value, dict):
            _toml_table(f"[{_toml_key(key)}]", value, out)
        elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
            for item in value:
                _toml_table(f"[[{_toml_key(key)}]]", item, out)
        else:
            raise TypeError(f"top-level {key!r} must be a table or an array of tables")
    return "\n".join(out)
