"""The one log configuration: JSON lines (UTC ISO time, level, event, fields as JSON) off a
terminal or under the journal, logfmt on a terminal; levels filter; stdlib records too."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import subprocess
import sys
from datetime import datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.logs import FORMATS, choose_format, configure


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)


@pytest.mark.parametrize("requested", FORMATS)
@pytest.mark.parametrize("isatty", [True, False])
@pytest.mark.parametrize("journal", [None, "8:123"])
def test_choose_format(requested: str, isatty: bool, journal: str | None) -> None:
    env = {"JOURNAL_STREAM": journal} if journal else {}
    got = choose_format(requested, isatty, env)
    if requested != "auto":
        assert got == requested
    else:
        assert got == ("text" if isatty and not journal else "json")


def test_unknown_format_and_level_are_refused() -> None:
    with pytest.raises(ValueError, match="log format 'xml'"):
        choose_format("xml", True, {})
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure("loud", "json", io.StringIO())


def test_json_lines() -> None:
    buf = io.StringIO()
    assert configure("info", "json", buf) == "json"
    log = structlog.get_logger("convergent.agent")
    log.info("agent.ready", node="n1", ip=IPv4Address("10.5.5.1"), count=3, drops={"old": 2})
    log.debug("not.written")
    logging.getLogger("asyncio").warning("from the stdlib %s", "logger")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["level"] == "info" and first["event"] == "agent.ready"
    assert first["logger"] == "convergent.agent"
    assert first["ip"] == "10.5.5.1" and first["count"] == 3 and first["drops"] == {"old": 2}
    when = datetime.fromisoformat(first["timestamp"])
    assert when.utcoffset() == timedelta(0)
    assert lines[1] == {"timestamp": lines[1]["timestamp"], "level": "warning",
                        "logger": "asyncio", "event": "from the stdlib logger"}


def test_text_is_logfmt_without_reprs() -> None:
    buf = io.StringIO()
    configure("debug", "text", buf)
    log = structlog.get_logger("convergent.reconcile")
    log.debug("reconcile.pass", changed=["10.5.5.1"], ms=1.5, note="two words")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("reconcile.failed")
    first, second = buf.getvalue().splitlines()
    assert first.startswith("timestamp=") and "Z level=debug logger=convergent.reconcile " \
        "event=reconcile.pass " in first
    assert 'changed="[\\"10.5.5.1\\"]"' in first and "ms=1.5" in first
    assert 'note="two words"' in first
    assert "level=error" in second and "RuntimeError: boom" in second  # one line


def _emit_from_child(env: dict[str, str], use_pty: bool) -> str:
    code = ("from orchestrator.logs import configure; import structlog; configure(); "
            "structlog.get_logger('t').info('hello', k=1)")
    if not use_pty:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, timeout=60).stderr
    parent, child = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", code], env=env, stderr=child, check=True,
                       timeout=60)
        return os.read(parent, 4096).decode()
    finally:
        os.close(parent)
        os.close(child)


def test_auto_format_in_a_real_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    assert json.loads(_emit_from_child(env, use_pty=False))["event"] == "hello"
    assert _emit_from_child(env, use_pty=True).strip().endswith("event=hello k=1")
    journal = json.loads(_emit_from_child({**env, "JOURNAL_STREAM": "8:42"}, use_pty=True))
    assert journal["k"] == 1


def test_cli_options_configure_logging() -> None:
    result = CliRunner().invoke(cli, ["--log-level", "loud", "lab", "-h"])
    assert result.exit_code == 2 and "loud" in result.output
    seed = str(Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml")
    result = CliRunner().invoke(cli, ["--log-format", "json", "--log-level", "error",
                                      "render-rules", "--config", seed, "--node", "node1"])
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == logging.ERROR
    assert logging.getLogger().handlers[0].formatter.processors[-1].__class__.__name__ \
        == "JSONRenderer"


def test_is_journal_matches_the_stream_named_by_journal_stream(tmp_path: Path) -> None:
    from orchestrator.logs import is_journal

    with open(tmp_path / "out", "w") as f:
        st = os.fstat(f.fileno())
        assert is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not is_journal(f, {})
    assert not is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
