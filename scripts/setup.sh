#!/usr/bin/env bash
# Install what convergent's lab and tests need on a fresh Debian machine (run as root):
# Debian packages for the kernel data path and real peers, and a venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(nftables conntrack conntrackd iproute2 socat tcpdump iputils-arping iputils-ping
          openssh-server openssh-client procps psmisc kmod python3 python3-venv python3-pip
          systemd etcd-server etcd-client openssl)
# the libvirt lab: real libvirtd + QEMU (TCG) per node; -sysv instead of systemd-sysv (FACTS.md);
# libvirt-dev, pkg-config, gcc, python3-dev build libvirt-python; e2fsprogs and binutils
# (mke2fs, readelf) and Debian's python3.11 (bytecode) build the guest image
PACKAGES+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
           libvirt-daemon-system libvirt-daemon-system-sysv libvirt-dev pkg-config gcc
           python3-dev python3.11 e2fsprogs binutils util-linux)

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (network namespaces, apt-get)" >&2
    exit 1
fi
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Packages such as etcd-server start a daemon from their postinst. Nothing here wants
    # one (tests and the lab start their own members on Unix sockets): forbid starting
    # services during the install, unless the machine already has its own policy.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { [ -z "$policy" ] || rm -f "$policy"; exit 1; }
    [ -z "$policy" ] || rm -f "$policy"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev,plot,lab,bench,kvm]'
# Debian's Xen hotplug scripts for the Xen tests and `lab up --hypervisor xl`: downloaded and
# unpacked into a cache, never installed (xen-utils-common pulls in udev and systemd-sysv)
.venv/bin/python -m orchestrator.xen.lab.debian
echo "setup: ok ($(.venv/bin/python --version), $(nft --version))"
