"""The lab's hook (hooks/lab) run by hand, outside any lab: it answers, exits 0 and writes
nothing (without settings it must not spool into the host's /var/spool/convergent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestrator.lab.hookrun import hook_path
from tests.conftest import SYSTEM_DIRS


def test_without_settings_the_lab_hook_spools_nothing(tmp_path: Path) -> None:
    spool = SYSTEM_DIRS[0]
    before = sorted(spool.iterdir()) if spool.is_dir() else None
    done = subprocess.run([sys.executable, "-I", "-S", str(hook_path()), "started", "g"],
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["verdict"] == "allow" and "no hook settings" in verdict["reason"]
    assert "spooled" not in verdict
    assert (sorted(spool.iterdir()) if spool.is_dir() else None) == before
    assert list(tmp_path.iterdir()) == []


def test_with_settings_it_still_spools_where_they_say(tmp_path: Path) -> None:
    conf = tmp_path / "hook.json"
    conf.write_text(json.dumps({"socket": str(tmp_path / "nobody.sock"),
                                "spool_dir": str(tmp_path / "spool"), "timeout_s": 1.0}))
    done = subprocess.run([sys.executable, "-I", "-S", str(hook_path()), "started", "g"],
                          env={"PATH": "/usr/bin:/bin", "CONVERGENT_HOOK_CONF": str(conf)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    spooled = json.loads(done.stdout)["spooled"]
    assert Path(spooled).parent == tmp_path / "spool" and Path(spooled).exists()



def test_the_hook_settings_follow_the_callers_timeout(tmp_path: Path) -> None:
    """lab up writes them first (its 1.5 s); a move on an etcd lab needs the hook to wait
    longer than the store takes to refuse: the file must say so, not keep the first."""
    from orchestrator.config.loader import parse
    from orchestrator.lab.hookrun import hook_conf
    from orchestrator.lab.plan import default_config

    agent = parse(default_config(3)).agent
    path = hook_conf(tmp_path, "n1", agent, 1.5)
    assert json.loads(path.read_text())["timeout_s"] == 1.5
    ino = path.stat().st_ino
    assert hook_conf(tmp_path, "n1", agent, 1.5) == path and path.stat().st_ino == ino
    hook_conf(tmp_path, "n1", agent, 7.0)
    conf = json.loads(path.read_text())
    assert conf["timeout_s"] == 7.0 and conf["spool_dir"] == str(agent.spool("n1"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["n1.json"]  # no temporary left
