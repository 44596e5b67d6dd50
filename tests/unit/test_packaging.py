"""The distribution a wheel built from this tree installs: one namespace (``orchestrator``),
``kvm/``, ``xen/`` and ``hooks/`` inside it, no ``bench``; the licence; extras for what only
the lab and the benchmarks need; and entry points that resolve."""

from __future__ import annotations

import ast
import email
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from importlib import import_module, metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# repository folder -> where the wheel puts it
MAPPED = {"orchestrator": "orchestrator", "kvm": "orchestrator/kvm", "xen": "orchestrator/xen",
          "hooks": "orchestrator/hooks"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    had_build = (ROOT / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(out), str(ROOT)],
                       check=True, capture_output=True, timeout=300)
    finally:
        if not had_build:  # setuptools builds in the tree; leave it as we found it
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (path,) = out.glob("convergent-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_one_top_level_namespace(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"orchestrator"}
    for banned in ("bench", "hooks", "kvm", "xen", "tests"):
        assert banned not in tops


def test_every_tracked_file_of_the_four_roots_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    """Modules and the data beside them (hook scripts, guest files): what git tracks under
    orchestrator/ kvm/ xen/ hooks/ is installed, at its mapped place."""
    names = set(wheel.namelist())
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", *MAPPED], check=True,
                             capture_output=True, text=True).stdout.split()
    expected = [f"{MAPPED[path.split('/', 1)[0]]}/{path.split('/', 1)[1]}" for path in tracked
                if not path.endswith(".md")]
    assert len(expected) > 50 and not [e for e in expected if e not in names]
    assert "orchestrator/hooks/hookclient.py" in names
    assert not [n for n in names if n.startswith("bench/") or "/bench/" in n]


def test_metadata_licence_version_and_extras(wheel: zipfile.ZipFile) -> None:
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.message_from_bytes(wheel.read(meta_name))
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
    assert meta["Version"] not in ("0.0.0", "0.1.0")  # from git, not the fallback
    requires = meta.get_all("Requires-Dist") or []
    unconditional = [r for r in requires if "extra ==" not in r]
    for lab_only in ("pyroute2", "websockets", "matplotlib"):
        assert not [r for r in unconditional if r.startswith(lab_only)], lab_only
    assert any(r.startswith("websockets") and 'extra == "lab"' in r for r in requires)
    assert any(r.startswith("pyroute2") and 'extra == "bench"' in r for r in requires)


def test_installed_entry_points_resolve() -> None:
    """Each names a module of ours that defines the attribute; each loads, unless what is
    missing is a third-party module (an extra, e.g. libvirt-python for ``kvm``, that this
    venv lacks: scripts/setup.sh installs every extra, so CI loads them all)."""
    eps = metadata.distribution("convergent").entry_points
    assert {ep.group for ep in eps} >= {"console_scripts", "convergent.hypervisors"}
    for ep in eps:
        spec = importlib.util.find_spec(ep.module)
        assert spec is not None and spec.origin, ep
        tree = ast.parse(Path(spec.origin).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef
                                                            | ast.AsyncFunctionDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        assert ep.attr in defined, ep
        try:
            assert ep.load() is not None, ep
        except ModuleNotFoundError as exc:
            assert exc.name and not exc.name.startswith("orchestrator"), (ep, exc)


def test_mapped_packages_import_under_the_namespace() -> None:
    hookclient = import_module("orchestrator.hooks.hookclient")
    assert Path(hookclient.__file__).parent == ROOT / "hooks"
    for name in ("orchestrator.kvm", "orchestrator.xen"):
        assert Path(import_module(name).__file__).parent == ROOT / name.split(".")[1]
