"""The guest image builder's pure parts: apt stanzas, the cache key, module load order."""

from __future__ import annotations

import pytest

from kvm.image import (
    Package,
    image_key,
    kernel_package,
    load_order,
    missing_libraries,
    module_depends,
    module_name,
    parse_apt_show,
)
from orchestrator.errors import LabError

APT_SHOW = """Package: openssh-server
Version: 1:9.2p1-2+deb12u10
SHA256: aa11
Depends: libc6 (>= 2.36)

Package: openssh-server
Version: 1:9.2p1-2+deb12u3
SHA256: bb22

Package: python3-websockets
Version: 10.4-1
SHA256: cc33
"""


def test_apt_show_takes_the_first_stanza_of_each_package() -> None:
    got = parse_apt_show(APT_SHOW)
    assert got == {"openssh-server": Package("openssh-server", "1:9.2p1-2+deb12u10", "aa11"),
                   "python3-websockets": Package("python3-websockets", "10.4-1", "cc33")}


def test_kernel_package_from_the_meta_package() -> None:
    meta = "Package: linux-image-amd64\nDepends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n"
    assert kernel_package(meta) == "linux-image-6.1.0-57-amd64"
    with pytest.raises(LabError, match="names no kernel package"):
        kernel_package("Package: linux-image-amd64\nDepends: nothing\n")


def test_key_changes_with_any_input_and_not_with_order() -> None:
    a, b = Package("a", "1", "x"), Package("b", "2", "y")
    files = {"guest/init": b"#!/bin/sh\n", "lab/flow_servers.py": b"print()\n"}
    base = image_key([a, b], files)
    assert image_key([b, a], dict(reversed(files.items()))) == base
    assert image_key([a, Package("b", "3", "y")], files) != base
    assert image_key([a, Package("b", "2", "z")], files) != base
    assert image_key([a, b], {**files, "guest/init": b"#!/bin/sh\n:\n"}) != base
    assert image_key([a, b], files, modules=("virtio_net",)) != base


def test_modinfo_depends_and_names() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_net\0"
    assert module_depends(ko) == ["virtio", "virtio_ring"]
    assert module_depends(b"\0depends=\0name=virtio_ring\0") == []
    assert module_depends(b"no modinfo at all") == []
    assert module_name("./lib/modules/6.1/kernel/arch/x86/crypto/crc32c-intel.ko") == "crc32c_intel"


def test_load_order_puts_dependencies_first_once() -> None:
    deps = {"virtio_net": ["virtio", "net_failover"], "net_failover": ["failover"],
            "failover": [], "virtio": ["virtio_ring"], "virtio_ring": [],
            "virtio_blk": ["virtio", "virtio_ring"]}
    order = load_order(["virtio_net", "virtio_blk"], deps)
    assert sorted(order) == sorted(deps)
    for mod, needs in deps.items():
        assert all(order.index(n) < order.index(mod) for n in needs)


def test_load_order_names_what_is_missing_or_circular() -> None:
    with pytest.raises(LabError, match="ext4 is not in the kernel package"):
        load_order(["ext4"], {})
    with pytest.raises(LabError, match="cycle"):
        load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_missing_libraries_lists_only_the_gaps() -> None:
    needed = {"usr/sbin/sshd": ["libc.so.6", "libcrypto.so.3"], "usr/bin/x": ["libc.so.6"]}
    assert missing_libraries(needed, {"libc.so.6"}) == {"usr/sbin/sshd": ["libcrypto.so.3"]}
    assert missing_libraries(needed, {"libc.so.6", "libcrypto.so.3"}) == {}
