"""Re-record ``events.hex``: conntrack events as the kernel sends them, one ``recv`` per
line, while ``conntrack`` (conntrack-tools, a second tool) changes a fresh namespace.

    sudo python3 tests/data/ctnetlink/record_events.py > tests/data/ctnetlink/events.hex

The socket binds the three ctnetlink groups before anything happens (an entry made while
nobody listens never reports later). Stdlib only: nothing of convergent is used to record
what convergent is tested against."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import uuid

NS = f"cvt-rec-{uuid.uuid4().hex[:6]}"
CHANGES = [  # (what, conntrack arguments)
    ("tcp NEW", ["-I", "-p", "tcp", "-s", "10.5.5.201", "-d", "198.51.100.7", "--sport", "40000",
                 "--dport", "443", "--state", "ESTABLISHED", "-t", "300", "-u",
                 "SEEN_REPLY,ASSURED", "-m", "1"]),
    ("udp NEW in zone 3", ["-I", "-p", "udp", "-s", "192.168.122.1", "-d", "10.5.5.201",
                           "--sport", "5000", "--dport", "123", "-t", "120", "-w", "3"]),
    ("tcp UPDATE (mark)", ["-U", "-p", "tcp", "-s", "10.5.5.201", "--sport", "40000",
                           "-m", "2"]),
    ("tcp DESTROY", ["-D", "-p", "tcp", "-s", "10.5.5.201", "--sport", "40000"]),
]


def main() -> None:
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        box: list[socket.socket] = []

        def open_in_ns() -> None:  # a socket keeps the namespace it was created in
            fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
            ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000)
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
            s.bind((0, 0b111))  # NEW, UPDATE, DESTROY
            box.append(s)

        t = threading.Thread(target=open_in_ns)
        t.start()
        t.join()
        sock = box[0]
        sock.settimeout(2)
        for what, args in CHANGES:
            subprocess.run(["ip", "netns", "exec", NS, "conntrack", *args], check=True,
                           capture_output=True)
            data = sock.recv(65536)
            print(f"# {what}")
            print(data.hex())
        sock.close()
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=True)


if __name__ == "__main__":
    main()
