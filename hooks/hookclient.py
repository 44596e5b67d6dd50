"""The hook side of the agent's intake: stdlib only, so a hook starts in a few ms under
``python3 -I -S`` (DESIGN §5). Hooks forward, they don't think: a hook builds one raw call
(argv, env, stdin, what only exists at hook time), sends it as one JSON line to the local
agent's socket and waits ``timeout_s`` for the answer. When the agent is absent, hung or
answers nonsense, the call is spooled (written whole, then renamed into place) and the
hook carries on as if the agent had said "allow": a hypervisor is never blocked or failed
because convergent is down.

Where the agent is comes from ``hook.json`` beside the installed hook (libvirt gives hooks
an environment of only LC_ALL, PATH and HOME), or from ``$CONVERGENT_HOOK_CONF``:
``{"socket": "/run/convergent/agent-n1.sock", "spool_dir": "/var/spool/convergent",
"timeout_s": 1.5, "node": "n1"}``.

Request: ``{"op": "hook.deliver", "args": {"call": {...}}}``; answer:
``{"ok": true, "result": {"verdict": "allow" | "deny", "reason": "..."}}``.
"""

from __future__ import annotations

import _socket
import os
import time

TYPE_CHECKING = False  # typing itself costs a hook ~2 ms of start-up
if TYPE_CHECKING:
    from typing import Any

try:  # the C half of the json module, without json/__init__'s import of re (and enum)
    import _json
except ImportError:  # not CPython: the json module itself, slower to import
    _json = None  # type: ignore[assignment]

DEFAULT_CONF = {"socket": "/run/convergent/agent.sock", "spool_dir": "/var/spool/convergent",
                "timeout_s": 1.5, "node": ""}
SPOOL_SUFFIX = ".call.json"


def load_conf(hook_path: str) -> dict[str, Any]:
    """The hook's settings: ``$CONVERGENT_HOOK_CONF``, else ``hook.json`` beside the hook
    (the real path: hooks are often symlinked into the hypervisor's directory)."""
    conf = dict(DEFAULT_CONF)
    path = os.environ.get("CONVERGENT_HOOK_CONF") or os.path.join(
        os.path.dirname(os.path.realpath(hook_path)), "hook.json")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = loads(f.read())
        if isinstance(loaded, dict):
            conf.update(loaded)
    except (OSError, ValueError):
        pass  # defaults: still spool where the agent looks by default
    return conf


def make_call(hook: str, argv: list[str], env: dict[str, str] | None = None, stdin: str = "",
              extra: dict[str, str] | None = None) -> dict[str, Any]:
    return {"hook": hook, "argv": list(argv), "env": dict(env or {}), "stdin": stdin,
            "extra": dict(extra or {}), "at": time.time(), "id": os.urandom(16).hex()}


def deliver(call: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    """Send ``call`` to the agent; on any failure spool it. Returns the agent's verdict,
    or ``{"verdict": "allow", "spooled": path, "reason": why}`` when it was spooled."""
    try:
        reply = _ask(conf["socket"], call, float(conf["timeout_s"]))
    except (OSError, ValueError) as exc:
        return {"verdict": "allow", "spooled": spool(call, conf["spool_dir"]),
                "reason": f"agent unavailable: {exc or type(exc).__name__}"}
    if reply.get("ok") is True and isinstance(reply.get("result"), dict):
        result: dict[str, Any] = reply["result"]
        return result
    # the agent answered but could not take the event: keep it for the replay
    return {"verdict": "allow", "spooled": spool(call, conf["spool_dir"]),
            "reason": f"agent refused: {reply.get('error') or 'no result'}"}


def _ask(path: str, call: dict[str, Any], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    # _socket, not socket: the module's enums and selectors cost a hook ~6 ms of start-up
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(dumps({"op": "hook.deliver", "args": {"call": call}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed without an answer")
            buf += chunk
    finally:
        s.close()
    reply = loads(buf.decode("utf-8"))
    if not isinstance(reply, dict):
        raise ValueError("answer is not an object")
    return reply


def spool(call: dict[str, Any], spool_dir: str) -> str:
    """Write the call whole under a temporary name, fsync, then rename: the agent's replay
    never sees half a file. Names sort by time, so replay keeps the order."""
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    name = f"{int(float(call.get('at') or time.time()) * 1e9):020d}-{call['id']}"
    tmp = os.path.join(spool_dir, f".{name}.tmp")
    final = os.path.join(spool_dir, name + SPOOL_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, dumps(call).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    return final


# --- JSON at the cost of a C module ------------------------------------------------------
# ``import json`` costs a hook ~9 ms of its ~20 (it imports re, re imports enum): most of
# what a hook adds to the bare interpreter. json's own encoder and scanner are C code in
# ``_json``; driven directly with json's defaults they give json.dumps / json.loads's
# results (tests/unit/test_hookclient_json.py holds them to json on generated values).


class _ScanContext:
    """What json.decoder.JSONDecoder hands its C scanner, with json's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not allowed here")


def _refuse(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # any object with these


def dumps(obj: Any) -> str:
    """``json.dumps(obj, separators=(",", ":"))``."""
    if _json is None:
        import json

        return json.dumps(obj, separators=(",", ":"))
    # a new encoder per call, as json makes one: its circular-reference markers are per call
    encode = _json.make_encoder(
        {}, _refuse, _json.encode_basestring_ascii, None, ":", ",", False, False, True)
    return "".join(encode(obj, 0))


def loads(text: str) -> Any:
    """``json.loads(text)``, every failure a ValueError (NaN and Infinity refused)."""
    if _json is None:
        import json

        return json.loads(text)
    body = text.strip(" \t\n\r")
    try:
        value, end = _scan(body, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(body):
        raise ValueError(f"extra data at {end}")
    return value
