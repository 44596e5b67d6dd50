"""One-shot client used inside lab namespaces: prints what the server answered, as JSON.

``python -m orchestrator.lab.probe tcp|udp HOST PORT`` -> {"ok", "answer", "local", "from"}.
"""

from __future__ import annotations

import json
import socket
import sys


def tcp(host: str, port: int, timeout: float) -> dict[str, object]:
    with socket.create_connection((host, port), timeout=timeout) as s:
        local = s.getsockname()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    return {"ok": True, "answer": body, "local": f"{local[0]}:{local[1]}",
            "from": f"{host}:{port}"}


def udp(host: str, port: int, timeout: float) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind(("0.0.0.0", 0))
        s.sendto(b"ping\n", (host, port))
        data, addr = s.recvfrom(4096)  # unconnected: we see the reply's real source
        local = s.getsockname()
    return {"ok": True, "answer": data.decode(errors="replace").strip(),
            "local": f"{local[0]}:{local[1]}", "from": f"{addr[0]}:{addr[1]}"}


def main() -> None:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    try:
        result = (tcp if kind == "tcp" else udp)(host, port, timeout)
    except OSError as exc:
        result = {"ok": False, "error": str(exc) or type(exc).__name__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
