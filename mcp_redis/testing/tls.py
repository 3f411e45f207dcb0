"""Throwaway TLS material for tests: a CA and certificates made with ``openssl``.

`Pki` writes, into a directory, a private CA and certificates signed by it:

* ``server``: for ``IP:127.0.0.1`` and ``DNS:localhost`` (a single server);
* ``node``: for ``IP:127.0.0.1`` only, used by every process of a TLS
  topology (it is their server *and* client certificate: replicas, Sentinels
  and the cluster bus present it to each other), so connecting to a node as
  ``localhost`` is a host-name mismatch;
* ``client``: a client certificate (``extendedKeyUsage=clientAuth``);
* ``otherhost``: for ``DNS:redis.example.org``: trusted chain, wrong name;
* ``rogue``: a self-signed certificate for ``127.0.0.1`` from no trusted CA.

`Pki.server_args` is what a ``redis-server`` needs to serve TLS only
(``--port 0``), and `Pki.client_kwargs` what a redis-py client needs to
reach it.
"""

from __future__ import annotations

import pathlib
import shutil
import ssl
import subprocess
from typing import Any, Dict, List, Union

__all__ = ["Pki", "openssl_available"]


def openssl_available() -> bool:
    """True when the ``openssl`` command is on PATH."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    """A throwaway CA and its certificates in `directory` (see the module doc)."""

    def __init__(self, directory: Union[str, pathlib.Path]) -> None:
        self.dir = d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # The extensions Python 3.13's strict verification (VERIFY_X509_STRICT, on by default)
        # asks of a CA and of the certificates it signs: without them every handshake failed there.
        ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-addext", "subjectKeyIdentifier=hash")
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                 "-days", "2", "-subj", "/CN=mcp_redis test CA", *ca_ext, cwd=d)
        leaf = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        (d / "server.ext").write_text(leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        (d / "node.ext").write_text(leaf + "subjectAltName=IP:127.0.0.1\n")
        (d / "client.ext").write_text(leaf + "extendedKeyUsage=clientAuth\n")
        # Signed by the trusted CA, but for another host: the name check must refuse it.
        (d / "otherhost.ext").write_text(leaf + "subjectAltName=DNS:redis.example.org\n")
        for name, subject in (("server", "/CN=127.0.0.1"), ("node", "/CN=127.0.0.1"),
                              ("client", "/CN=mcp_redis client"), ("otherhost", "/CN=redis.example.org")):
            _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                     "-subj", subject, cwd=d)
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                     "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
        # A second, unrelated CA: a server signed by it must not be trusted.
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
                 "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", *ca_ext, cwd=d)
        for f in d.glob("*.key"):
            f.chmod(0o600)

    def __repr__(self) -> str:
        return f"Pki({str(self.dir)!r})"

    def path(self, name: str) -> str:
        """The file `name` (``ca.crt``, ``node.key``, ...) in the directory."""
        return str(self.dir / name)

    def server_args(self, port: int, *, cert: str = "node", auth_clients: str = "yes") -> List[str]:
        """``redis-server`` arguments to serve TLS only on `port` (plaintext port 0).

        Replication, Sentinel links and the cluster bus use TLS too, with
        `cert` as the client certificate they present to each other.
        """
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", self.path(f"{cert}.crt"), "--tls-key-file", self.path(f"{cert}.key"),
            "--tls-ca-cert-file", self.path("ca.crt"), "--tls-auth-clients", auth_clients,
            "--tls-replication", "yes",
        ]

    def client_kwargs(self, cert: str = "client") -> Dict[str, Any]:
        """redis-py keyword arguments for a verified TLS connection with a client certificate."""
        return {"ssl": True, "ssl_ca_certs": self.path("ca.crt"), "ssl_certfile": self.path(f"{cert}.crt"),
                "ssl_keyfile": self.path(f"{cert}.key"), "ssl_check_hostname": False}

    def client_context(self, cert: str = "client") -> ssl.SSLContext:
        """An `ssl.SSLContext` trusting the CA and presenting `cert` (no host-name check: admin use)."""
        context = ssl.create_default_context(cafile=self.path("ca.crt"))
        context.check_hostname = False
        context.load_cert_chain(self.path(f"{cert}.crt"), self.path(f"{cert}.key"))
        return context
