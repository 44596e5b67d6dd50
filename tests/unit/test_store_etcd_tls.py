"""``etcds://``: the store over TLS with client certificates, against a real etcd member
that requires them (certificates made here with openssl; Unix sockets, no network).
A client without a certificate, or trusting another CA, is refused in one line."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from orchestrator.errors import StoreError
from orchestrator.lab.etcd import EtcdCluster, etcd_binary
from orchestrator.store import open_store

pytestmark = pytest.mark.skipif(etcd_binary() is None or shutil.which("openssl") is None,
                                reason="needs etcd (etcd-server) and openssl")
NAME = "etcd-test"  # the name in the member's certificate


def openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
            "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}")


def make_cert(d: Path, ca: str, name: str, usage: str, san: str | None = None) -> None:
    (d / f"{name}.cnf").write_text(
        f"[x]\nextendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
            "-out", f"{name}.csr", "-subj", f"/CN={name}")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
            f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.cnf", "-extensions", "x")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "member", "serverAuth,clientAuth", f"DNS:{NAME}")
    make_cert(d, "ca", "client", "clientAuth")
    tls = {"cert": str(d / "member.pem"), "key": str(d / "member-key.pem"),
           "ca": str(d / "ca.pem"), "client_cert": str(d / "client.pem"),
           "client_key": str(d / "client-key.pem")}
    with EtcdCluster.create(["solo"], tls=tls) as cluster:
        cluster.start()
        cluster.wait_ready()
        yield cluster, d


def test_tls_with_a_client_certificate_works(tls_cluster: tuple[EtcdCluster, Path]) -> None:
    cluster, d = tls_cluster
    url = cluster.url("/tls", ca=d / "ca.pem", cert=d / "client.pem", key=d / "client-key.pem",
                      server_name=NAME)
    assert url.startswith("etcds://")

    async def main() -> None:
        async with await open_store(url) as store:
            rev = await store.revision()
            await store.claim("10.5.5.10", "n1", "web", 0)
            async with aclosing(store.watch(rev)) as changes:
                change = await asyncio.wait_for(anext(changes), 5)
            assert change.record.epoch == 1  # type: ignore[union-attr]

    asyncio.run(main())


@pytest.mark.parametrize(("options", "why"), [
    ({"ca": "ca.pem"}, "no client certificate"),
    ({"ca": "other-ca.pem", "cert": "client.pem", "key": "client-key.pem"}, "another CA"),
])
def test_tls_refusals_are_one_line(tls_cluster: tuple[EtcdCluster, Path],
                                   options: dict[str, str], why: str) -> None:
    cluster, d = tls_cluster
    url = cluster.url("/tls", server_name=NAME, timeout=1,
                      **{k: str(d / v) for k, v in options.items()})
    with pytest.raises(StoreError) as err:
        asyncio.run(open_store(url))
    msg = str(err.value)
    assert "\n" not in msg and "TLS with the members failed" in msg, (why, msg)
    assert "check ca=, cert=, key= and server_name=" in msg
