"""``convergent install-hooks --xen``: files in place, idempotent, says how to enable it,
never touches a guest's config; uninstall removes only its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "seed-2node.toml"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    scripts = tmp_path / "etc/xen/scripts"
    scripts.mkdir(parents=True)
    (scripts / "vif-bridge").write_text("#!/bin/sh\nexit 0\n")
    (scripts / "vif-bridge").chmod(0o755)
    (tmp_path / "etc/xen/web.cfg").write_text("name = 'web'\nvif = [ 'bridge=xenbr0' ]\n")
    (tmp_path / "etc/xen/xl.conf").write_text("#autoballoon=\"auto\"\n")
    return tmp_path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Through the command's entry point, which turns errors into one line."""
    def invoke(*args: str) -> tuple[int, str]:
        try:
            main(["install-hooks", *args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err
    return invoke


def node_of(config: Path) -> str:
    import tomllib
    return str(tomllib.loads(config.read_text())["nodes"][0]["name"])


def test_install_puts_script_and_conf_and_says_how_to_enable(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    before = {p: p.read_text() for p in (root / "etc/xen").glob("*.c*")}
    node = node_of(CONFIG)
    code, out = run("--xen", "--root", str(root), "--config", str(CONFIG), "--node", node)
    assert code == 0, out
    script = root / "etc/xen/scripts/convergent-vif"
    assert script.read_text() == (ROOT / "hooks/xen-vif").read_text()
    assert script.stat().st_mode & 0o777 == 0o755
    conf = json.loads((root / "etc/xen/scripts/hook.json").read_text())
    assert conf["node"] == node and conf["wrap"] == "vif-bridge"
    assert conf["socket"].endswith(f"agent-{node}.sock") and conf["spool_dir"]
    assert f"installed {script}" in out
    assert "script=convergent-vif" in out and 'vif.default.script="convergent-vif"' in out
    assert "Nothing was changed in any guest's config" in out
    assert {p: p.read_text() for p in (root / "etc/xen").glob("*.c*")} == before

    code, again = run("--xen", "--root", str(root), "--config", str(CONFIG), "--node", node)
    assert code == 0 and f"unchanged {script}" in again and "installed" not in again


def test_a_chosen_wrapped_script_is_kept_on_reinstall(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    route = root / "etc/xen/scripts/vif-route"
    route.write_text("#!/bin/sh\n")
    route.chmod(0o755)
    node = node_of(CONFIG)
    args = ("--xen", "--root", str(root), "--config", str(CONFIG), "--node", node)
    assert run(*args, "--wrap", "vif-route")[0] == 0
    assert run(*args)[0] == 0
    assert json.loads((root / "etc/xen/scripts/hook.json").read_text())["wrap"] == "vif-route"


def test_a_missing_wrapped_script_is_refused_in_one_line(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    code, out = run("--xen", "--root", str(root), "--config", str(CONFIG), "--node",
                    node_of(CONFIG), "--wrap", "vif-nonesuch")
    assert code == 1 and "vif-nonesuch, is not there or not executable" in out
    assert not (root / "etc/xen/scripts/convergent-vif").exists()


def test_uninstall_removes_its_files_and_warns(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    node = node_of(CONFIG)
    run("--xen", "--root", str(root), "--config", str(CONFIG), "--node", node)
    code, out = run("--xen", "--root", str(root), "--uninstall")
    assert code == 0 and "removed" in out and "point them back at vif-bridge" in out
    assert not (root / "etc/xen/scripts/convergent-vif").exists()
    assert (root / "etc/xen/scripts/vif-bridge").exists()
    code, out = run("--xen", "--root", str(root), "--uninstall")
    assert code == 0 and "nothing to remove" in out


def test_uninstall_leaves_a_foreign_script_alone(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    (root / "etc/xen/scripts/convergent-vif").write_text("#!/bin/sh\n# someone else's\n")
    code, out = run("--xen", "--root", str(root), "--uninstall")
    assert code == 1 and "is not convergent's vif script" in out
    assert (root / "etc/xen/scripts/convergent-vif").exists()


def test_json_says_what_was_done(root: Path, run: Callable[..., tuple[int, str]]) -> None:
    code, out = run("--xen", "--root", str(root), "--config", str(CONFIG), "--node",
                    node_of(CONFIG), "--json")
    assert code == 0
    doc = json.loads(out)["xen"]
    assert [d.split()[0] for d in doc["done"]] == ["installed", "installed"]
    assert "script=convergent-vif" in doc["advice"]


def test_a_kind_must_be_named(run: Callable[..., tuple[int, str]]) -> None:
    code, out = run("--root", "/nonexistent")
    assert code == 2 and "--xen" in out
