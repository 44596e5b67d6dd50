"""The lab's guest image: a Debian kernel, a busybox initramfs and a read-only ext4 root
disk holding real OpenSSH, Python 3 and python3-websockets, plus the lab's own flow servers.

Everything comes from Debian packages (``apt-get download`` + ``dpkg-deb -x``; nothing is
installed on the machine). The image is cached under ``cache_dir`` by a key over its inputs
(each package's name, version and checksum, the kernel modules, the guest scripts and the
guest-side Python files), so a second run with the same inputs builds nothing. The root
disk is attached read-only: a live migration copies no storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator.errors import LabError

CACHE_DIR = Path(os.environ.get("CONVERGENT_CACHE_DIR", "/var/cache/convergent"))
KERNEL_META = "linux-image-amd64"
# what the guest runs (OpenSSH, Python, websockets) and the libraries they link
GUEST_PACKAGES = (
    "busybox-static", "openssh-server", "openssh-client", "python3.11-minimal",
    "libpython3.11-minimal", "libpython3.11-stdlib", "python3-websockets",
    "libc6", "libgcc-s1", "libaudit1", "libcap-ng0", "libcom-err2", "libcrypt1",
    "libgssapi-krb5-2", "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0",
    "libpam0g", "libselinux1", "libpcre2-8-0", "libssl3", "libsystemd0", "libgcrypt20",
    "libgpg-error0", "liblz4-1", "liblzma5", "libzstd1", "libcap2", "libwrap0", "libnsl2",
    "libtirpc3", "libtirpc-common", "zlib1g", "libbsd0", "libmd0", "libedit2", "libtinfo6",
    "libfido2-1", "libcbor0.8", "libudev1", "libexpat1", "libffi8", "libbz2-1.0", "libuuid1",
)
# the drivers the initramfs loads (their dependencies are found in the modules themselves)
ROOT_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "ext4", "crc32c_generic")
# Python extensions whose libraries the guest does not carry: removed, so an import fails
# loudly instead of at an unlucky moment
PRUNED_EXTENSIONS = ("_dbm", "_gdbm", "_curses", "_curses_panel", "readline", "_sqlite3")
PRUNED_TREES = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
                "usr/share/lintian", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
                "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip")
GUEST_DIR = Path(__file__).parent / "guest"
LAB_PACKAGE = "orchestrator.lab"  # its flow servers and responder run inside the guest too
GUEST_PY = ("flow_servers.py", "responder.py", "flow_client.py")  # from orchestrator/lab
GUEST_SCRIPTS = ("initramfs-init", "init", "servers.py")
GUEST_PYTHON = "/usr/bin/python3.11"  # Debian's, as in the guest: the same bytecode
KEEP_IMAGES = 2


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class GuestImage:
    key: str
    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.gz"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.kernel, self.initrd, self.rootfs, self.manifest))


# pure parts -------------------------------------------------------------------------
def parse_apt_show(text: str) -> dict[str, Package]:
    """``apt-cache show --no-all-versions`` stanzas -> the candidate of each package."""
    found: dict[str, Package] = {}
    for stanza in text.strip().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", stanza, re.M))
        if "Package" in fields and fields["Package"] not in found:
            found[fields["Package"]] = Package(fields["Package"], fields.get("Version", ""),
                                               fields.get("SHA256", ""))
    return found


def kernel_package(meta_depends: str) -> str:
    """The versioned kernel package the meta package depends on."""
    m = re.search(r"\b(linux-image-\d[\w.+-]*-amd64)\b", meta_depends)
    if m is None:
        raise LabError(f"{KERNEL_META} names no kernel package: {meta_depends!r}")
    return m.group(1)


def image_key(packages: Iterable[Package], files: Mapping[str, bytes],
              modules: Sequence[str] = ROOT_MODULES) -> str:
    h = hashlib.sha256(f"modules={','.join(modules)}\n".encode())
    for p in sorted(packages, key=lambda p: p.name):
        h.update(f"pkg {p.name} {p.version} {p.sha256}\n".encode())
    for name in sorted(files):
        h.update(f"file {name} {hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()[:20]


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a kernel module's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".ko").replace("-", "_")


def load_order(roots: Sequence[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module ``roots`` need, each after its dependencies (insmod order)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise LabError(f"kernel modules depend on each other in a cycle: {path}")
        if name not in depends:
            raise LabError(f"kernel module {name} is not in the kernel package")
        for dep in depends[name]:
            visit(dep, (*path, name))
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


def missing_libraries(needed: Mapping[str, Sequence[str]],
                      present: set[str]) -> dict[str, list[str]]:
    """ELF file -> the sonames it needs that the image does not carry."""
    return {f: sorted(set(libs) - present) for f, libs in needed.items()
            if set(libs) - present}


# the build ---------------------------------------------------------------------------
def guest_files() -> dict[str, bytes]:
    files = {f"guest/{n}": (GUEST_DIR / n).read_bytes() for n in GUEST_SCRIPTS}
    files["builder"] = Path(__file__).read_bytes()  # how it is built is an input too
    files.update({f"lab/{n}": (resources.files(LAB_PACKAGE) / n).read_bytes()
                  for n in GUEST_PY})
    return files


def ensure_image(cache_dir: Path = CACHE_DIR) -> GuestImage:
    """The image for today's inputs: from the cache, or built (once, under a lock)."""
    kernel = kernel_package(_sh(["apt-cache", "show", "--no-all-versions", KERNEL_META]))
    names = (kernel, *GUEST_PACKAGES)
    packages = parse_apt_show(_sh(["apt-cache", "show", "--no-all-versions", *names]))
    missing = [n for n in names if n not in packages]
    if missing:
        raise LabError(f"apt knows no package {', '.join(missing)}: run apt-get update")
    files = guest_files()
    key = image_key(packages.values(), files)
    image = GuestImage(key, cache_dir / f"guest-{key}")
    if image.complete():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        if not image.complete():  # another builder may have finished meanwhile
            _build(image, packages, kernel, files, cache_dir)
            _prune(cache_dir, keep=image)
    return image


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _build(image: GuestImage, packages: Mapping[str, Package], kernel: str,
           files: Mapping[str, bytes], cache_dir: Path) -> None:
    debs = _download(packages, cache_dir / "debs")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        modules = _kernel(debs[kernel], out / "vmlinuz", work / "modules")
        _initramfs(debs["busybox-static"], modules, files, out / "initrd.gz", work / "initrd")
        _rootfs(debs, kernel, files, out / "rootfs.ext4", work / "root")
        manifest = {"key": image.key, "kernel": kernel, "modules": [m.stem for m in modules],
                    "packages": {n: p.version for n, p in sorted(packages.items())}}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(image.dir, ignore_errors=True)
        os.replace(out, image.dir)


def _download(packages: Mapping[str, Package], debs: Path) -> dict[str, Path]:
    """Each package's .deb, named by its checksum (so a cached file is the right one)."""
    debs.mkdir(parents=True, exist_ok=True)
    want = {n: debs / f"{p.sha256}.deb" for n, p in packages.items()}
    fetch = [n for n, path in want.items() if not path.exists()]
    if fetch:
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _sh(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                 *(f"{n}={packages[n].version}" for n in fetch)], cwd=tmp, timeout=600)
            for deb in Path(tmp).glob("*.deb"):
                digest = hashlib.sha256(deb.read_bytes()).hexdigest()
                os.replace(deb, debs / f"{digest}.deb")
    absent = [n for n, path in want.items() if not path.exists()]
    if absent:
        raise LabError(f"apt-get download gave no file matching the checksum of {absent}")
    return want


def _fsys_members(deb: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield member, tar
    finally:
        proc.stdout.close()
        proc.wait()


def _kernel(deb: Path, vmlinuz: Path, mod_dir: Path) -> list[Path]:
    """vmlinuz and the modules ROOT_MODULES need, in load order (two passes over the
    70 MB package instead of unpacking its 400 MB)."""
    depends: dict[str, list[str]] = {}
    for member, tar in _fsys_members(deb):
        if member.isfile() and member.name.endswith(".ko"):
            f = tar.extractfile(member)
            assert f is not None
            depends[module_name(member.name)] = module_depends(f.read())
    order = load_order(ROOT_MODULES, depends)
    mod_dir.mkdir(parents=True)
    for member, tar in _fsys_members(deb):
        name = module_name(member.name)
        wanted = (name in order if member.name.endswith(".ko")
                  else "/boot/vmlinuz-" in member.name)
        if member.isfile() and wanted:
            f = tar.extractfile(member)
            assert f is not None
            target = mod_dir / f"{name}.ko" if member.name.endswith(".ko") else vmlinuz
            target.write_bytes(f.read())
    if not vmlinuz.exists():
        raise LabError(f"{deb.name}: no /boot/vmlinuz-* in the kernel package")
    return [mod_dir / f"{m}.ko" for m in order]


def _initramfs(busybox_deb: Path, modules: Sequence[Path], files: Mapping[str, bytes],
               out: Path, tree: Path) -> None:
    _sh(["dpkg-deb", "-x", str(busybox_deb), str(tree)])
    (tree / "modules").mkdir()
    for m in modules:
        shutil.copy(m, tree / "modules" / m.name)
    (tree / "modules" / "order").write_text("\n".join(m.stem for m in modules) + "\n")
    init = tree / "init"
    init.write_bytes(files["guest/initramfs-init"])
    init.chmod(0o755)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    cpio = subprocess.run([str(tree / "bin" / "busybox"), "cpio", "-o", "-H", "newc"],
                          input="\n".join(names).encode() + b"\n", cwd=tree,
                          capture_output=True, check=True)
    out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))


def _rootfs(debs: Mapping[str, Path], kernel: str, files: Mapping[str, bytes], out: Path,
            tree: Path) -> None:
    tree.mkdir()
    for name, deb in sorted(debs.items()):
        if name != kernel:
            _sh(["dpkg-deb", "-x", str(deb), str(tree)])
    for sub in PRUNED_TREES:
        shutil.rmtree(tree / sub, ignore_errors=True)
    for ext in PRUNED_EXTENSIONS:
        for so in (tree / "usr/lib/python3.11/lib-dynload").glob(f"{ext}.cpython-*.so"):
            so.unlink()
    _system_files(tree, files)
    _busybox_links(tree)
    _check_libraries(tree)
    _precompile(tree)
    _sh(["ldconfig", "-r", str(tree)])
    size_mb = int(_tree_bytes(tree) * 1.3 / 2**20) + 32
    _sh(["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-L", "cvguest", "-b", "4096",
         "-d", str(tree), str(out), f"{size_mb}M"], timeout=120)


def _system_files(tree: Path, files: Mapping[str, bytes]) -> None:
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "var/empty", "etc", "opt/convergent"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    etc = tree / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    # '*': no password, but not locked (sshd refuses locked accounts without PAM)
    shadow = etc / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n")
    shadow.chmod(0o600)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n"
                                       "hosts: files\n")
    bindir = tree / "usr" / "bin"
    if not (bindir / "python3").exists():
        (bindir / "python3").symlink_to("python3.11")
    for name, data in files.items():
        if "/" not in name:
            continue
        target = tree / "opt" / "convergent" / name.split("/", 1)[1]
        target.write_bytes(data)
        target.chmod(0o755 if name.startswith("guest/init") else 0o644)


def _precompile(tree: Path) -> None:
    """Bytecode for everything the guest imports: Debian compiles it at install time, which
    never happens here, and compiling at every start under TCG takes seconds. Hash-based
    and unchecked, so it does not depend on file times; the same 3.11 bytecode as here."""
    dirs = [str(tree / d) for d in ("usr/lib/python3.11", "usr/lib/python3/dist-packages",
                                    "opt/convergent")]
    _sh([GUEST_PYTHON, "-m", "compileall", "-q", "-j", "0", "-s", str(tree), "-p", "/",
         "--invalidation-mode", "unchecked-hash", *dirs], timeout=300)


def _busybox_links(tree: Path) -> None:
    """busybox applets as /bin/NAME, wherever no real program of that name exists."""
    applets = _sh([str(tree / "bin" / "busybox"), "--list"]).split()
    taken = {p.name for d in ("bin", "sbin", "usr/bin", "usr/sbin") if (tree / d).is_dir()
             for p in (tree / d).iterdir()}
    for applet in applets:
        if applet not in taken:
            (tree / "bin" / applet).symlink_to("busybox")


def _check_libraries(tree: Path) -> None:
    """Every ELF file's needed sonames are in the image, or the build fails, naming them."""
    present = {p.name for d in ("lib", "usr/lib", "lib64")
               for p in (tree / d).rglob("*.so*")} if tree.exists() else set()
    needed: dict[str, list[str]] = {}
    for path in _elf_files(tree):
        out = _sh(["readelf", "-d", str(path)], check=False)
        libs = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
        if libs:
            needed[str(path.relative_to(tree))] = libs
    missing = missing_libraries(needed, present)
    if missing:
        first = ", ".join(f"{f} needs {' '.join(libs)}" for f, libs in list(missing.items())[:5])
        raise LabError(f"guest image: libraries missing from GUEST_PACKAGES: {first}")


def _elf_files(tree: Path) -> Iterator[Path]:
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def _tree_bytes(tree: Path) -> int:
    return sum(p.lstat().st_size for p in tree.rglob("*"))


def _prune(cache_dir: Path, keep: GuestImage) -> None:
    """Keep the newest few images; older keys are unreachable anyway."""
    images = sorted((p for p in cache_dir.glob("guest-*") if p != keep.dir),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _sh(argv: Sequence[str], check: bool = True, cwd: str | None = None,
        timeout: float = 60) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"guest image: {' '.join(argv[:3])}: {lines[-1] if lines else 'failed'}")
    return proc.stdout


def main() -> None:
    """``python -m orchestrator.kvm.image``: build (or find) the image, say where it is."""
    image = ensure_image()
    print(json.dumps({"key": image.key, "dir": str(image.dir)}))


if __name__ == "__main__":
    main()
