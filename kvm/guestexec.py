"""Run the lab's flow client inside a VM guest, over SSH, as if it ran here.

``python -m orchestrator.kvm.guestexec --host ADDR --key KEY --spec SPEC --result RESULT``
(spawned in a node namespace, which reaches the guest on its own guest bridge and, after
a migration, over the cluster pipes, with no NAT on the way): the spec goes to the guest,
the guest's ``flow_client.py --stop-on-eof`` runs there, its lines come out here; SIGTERM
closes its stdin, which stops it, and its result lands in RESULT. The flow harness treats
this process as it treats a flow client in a guest namespace.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from orchestrator.lab.flow_client import ssh_argv

RESULT_MARK = "CONVERGENT-RESULT "
GUEST_DIR = "/opt/convergent"
STOP_TIMEOUT_S = 20.0


def remote_command(spec: bytes, tag: str) -> str:
    b64 = base64.b64encode(spec).decode()
    return (f"cd {GUEST_DIR} && echo {b64} | base64 -d >/tmp/spec-{tag}.json && "
            f"python3 flow_client.py --spec /tmp/spec-{tag}.json --result /tmp/result-{tag}.json"
            f" --stop-on-eof; echo; echo \"{RESULT_MARK}$(cat /tmp/result-{tag}.json)\"")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args()
    argv = [*ssh_argv(a.key, a.host, 22)[:-1], remote_command(a.spec.read_bytes(),
                                                              str(os.getpid()))]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    stopping = threading.Event()

    def stop(_sig: int, _frame: object) -> None:
        stopping.set()
        assert proc.stdin is not None
        proc.stdin.close()  # the guest's client stops and prints its result

    signal.signal(signal.SIGTERM, stop)
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        if line.startswith(RESULT_MARK):
            tmp = a.result.with_suffix(".tmp")
            tmp.write_text(line[len(RESULT_MARK):])
            os.replace(tmp, a.result)
        elif line.strip():
            sys.stdout.write(line)
            sys.stdout.flush()
    proc.wait(timeout=STOP_TIMEOUT_S)


if __name__ == "__main__":
    main()
