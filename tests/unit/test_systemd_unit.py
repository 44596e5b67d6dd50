"""The systemd unit and tmpfiles entry: they match the agent's defaults, and systemd's own
tools accept them (``systemd-analyze verify`` / ``security``, ``systemd-tmpfiles``) where
those are installed."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.config.defaults import DEFAULT_CONFIG
from orchestrator.config.schema import AgentSettings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "convergent-agent@.service"
TMPFILES = ROOT / "systemd" / "convergent.conf"
CONVERGENT = ROOT / ".venv" / "bin" / "convergent"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_unit_runs_the_agent_as_a_notify_service() -> None:
    s = service()
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["Restart"] == "on-failure"
    assert re.fullmatch(r"\S+/convergent agent --node %i", s["ExecStart"])
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["Environment"] == f"CONVERGENT_CONFIG={DEFAULT_CONFIG}"
    assert set(s["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert "ProtectKernelTunables" not in s  # apply writes net.* sysctls


def test_directories_match_the_agent_defaults() -> None:
    s, d = service(), AgentSettings()
    assert Path("/run") / s["RuntimeDirectory"] == d.run_dir
    store = Path(d.store.removeprefix("sqlite://"))
    assert Path("/var/lib") / s["StateDirectory"] == store.parent
    assert Path("/var/log") / s["LogsDirectory"] == d.audit_log.parent
    assert Path("/etc") / s["ConfigurationDirectory"] == DEFAULT_CONFIG.parent \
        == d.key_file.parent
    assert s["ReadWritePaths"].lstrip("-") == str(d.spool_dir)
    (line,) = [ln for ln in TMPFILES.read_text().splitlines() if ln.startswith("d ")]
    assert line.split()[1] == str(d.spool_dir)


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def _instance(tmp_path: Path) -> Path:
    """The unit as installed for node n1, pointing at this checkout's convergent."""
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={CONVERGENT}", UNIT.read_text(), flags=re.M)
    path = tmp_path / "convergent-agent@n1.service"
    path.write_text(text)
    return path


@needs_systemd
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(_instance(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    # unknown or unparsable settings are only warnings (exit 0): any output is a failure
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


@needs_systemd
def test_systemd_analyze_verify_catches_a_bad_setting(tmp_path: Path) -> None:
    bad = _instance(tmp_path)
    bad.write_text(bad.read_text().replace("Type=notify", "Type=notifyy"))
    proc = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert "Failed to parse service type" in proc.stderr


@needs_systemd
def test_exposure_is_low(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                           str(_instance(tmp_path))], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-500:] + proc.stderr
    assert float(found.group(1)) <= 3.5  # "OK" on systemd's scale (10 = unprotected)


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-tmpfiles is not installed")
def test_tmpfiles_makes_the_spool(tmp_path: Path) -> None:
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                   check=True, capture_output=True, timeout=60)
    spool = tmp_path / str(AgentSettings().spool_dir).lstrip("/")
    assert spool.is_dir() and (spool.stat().st_mode & 0o777) == 0o750
