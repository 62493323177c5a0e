"""One logging configuration: [log] level and format, --log-level, in every edge process."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import eventually, run_edge_cli

from edge.server.config import LogSection
from edge.server.logging_setup import OWN_LOGGERS, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, own in levels.items():
        logging.getLogger(name).setLevel(own)


def _configured(settings: LogSection, level: str | None = None) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(settings, "edge worker 3", level, stream)  # type: ignore[arg-type]
    return stream


def test_text_lines_name_level_and_process(restore_logging: None) -> None:
    stream = _configured(LogSection())
    logging.getLogger("edge.server.worker").info("config reloaded")
    logging.getLogger("edge.queue.replayer").debug("hidden at info")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" INFO edge worker 3: config reloaded"), line
    assert line[:4].isdigit() and line.split(" ")[0].endswith("Z")


def test_level_applies_to_our_loggers_only(restore_logging: None) -> None:
    stream = _configured(LogSection(level="info"), level="debug")
    logging.getLogger("wake.controller").debug("ours at debug")
    logging.getLogger("scheduler_client.local.server").debug("control plane at debug")
    logging.getLogger("aiohttp.server").info("a library's info")
    logging.getLogger("asyncio").warning("a library's warning")
    text = stream.getvalue()
    assert "ours at debug" in text and "control plane at debug" in text
    assert "a library's info" not in text
    assert "a library's warning" in text


def test_json_is_one_object_per_line(restore_logging: None) -> None:
    stream = _configured(LogSection(format="json", level="debug"))
    log = logging.getLogger("edge.queue.replayer")
    log.debug("two\nlines")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed: %s", "x")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "two\nlines"
    assert (first["level"], first["process"], first["logger"]) == (
        "debug",
        "edge worker 3",
        "edge.queue.replayer",
    )
    assert {"time", "pid"} <= first.keys() and "exception" not in first
    assert second["message"] == "failed: x"
    assert "RuntimeError: boom" in second["exception"]


def test_setting_up_again_replaces_the_handler(restore_logging: None) -> None:
    first = _configured(LogSection(level="debug"))
    second = _configured(LogSection(level="warning"))
    logging.getLogger("edge").info("after reload")
    logging.getLogger("edge").warning("still shown")
    assert first.getvalue() == ""
    assert second.getvalue().count("\n") == 1 and "still shown" in second.getvalue()


# --------------------------------------------------------------------- real processes


def _lines(output: str, marker: str) -> list[str]:
    return [line for line in output.splitlines() if marker in line]


async def test_log_level_flag_shows_debug_from_supervisor_and_worker(start_edge) -> None:
    edge = start_edge(args=("--log-level", "debug"))

    def worker_debug() -> bool:
        return bool(_lines(edge.output(), "DEBUG edge worker 0: serving 1 app(s)"))

    await eventually(worker_debug, what="the worker's debug line")
    assert _lines(edge.output(), "DEBUG edge: started worker 0")


async def test_log_level_flag_overrides_the_config(start_edge) -> None:
    edge = start_edge(sections={"log": {"level": "debug"}}, args=("--log-level", "warning"))
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.wait(15) == 0
    output = edge.output()
    assert " DEBUG " not in output and " INFO " not in output, output


async def test_json_format_in_every_process(start_edge) -> None:
    edge = start_edge(sections={"log": {"level": "debug", "format": "json"}})
    await eventually(lambda: "serving 1 app(s)" in edge.output(), what="the worker's debug line")
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.wait(15) == 0
    entries = [json.loads(line) for line in edge.output().splitlines() if line]
    assert all(isinstance(entry, dict) for entry in entries)
    processes = {entry["process"] for entry in entries}
    assert processes == {"edge", "edge worker 0"}, entries
    listening = [e for e in entries if e["message"].startswith("listening on")]
    assert listening and listening[0]["level"] == "info"
    assert listening[0]["logger"] == "edge.server.supervisor"


async def test_reload_applies_a_new_log_level(start_edge) -> None:
    edge = start_edge()
    assert " DEBUG " not in edge.output()
    edge.config_path.write_text(edge.config_path.read_text() + '\n[log]\nlevel = "debug"\n')
    edge.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: "config reloaded" in edge.output(), what="the reload")
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.wait(15) == 0
    assert _lines(edge.output(), "DEBUG edge worker 0: stopping"), edge.output()


def test_control_plane_logs_its_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_edge_cli("controlplane", "--config", str(missing), "--log-level", "debug")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert " ERROR controlplane: " in line and str(missing) in line


def test_bad_log_level_flag_is_refused(tmp_path: Path) -> None:
    result = run_edge_cli("run", "--config", str(tmp_path / "x.toml"), "--log-level", "loud")
    assert result.returncode == 2
    assert "--log-level" in result.stderr and "debug" in result.stderr
