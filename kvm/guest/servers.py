"""The VM guest's application servers in one Python process (one interpreter start under
TCG instead of two): the lab's flow servers and its responder, unchanged.

``python3 servers.py --name NAME [--tcp P]... [--udp P]...`` (run from /opt/convergent).
"""

import argparse
import asyncio

import flow_servers
import responder


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    a = ap.parse_args()
    await asyncio.gather(flow_servers.serve_all(8765, 8000, 9123, 0.05),
                         responder.serve(a.name, a.tcp, a.udp))


asyncio.run(main())
