"""Throwaway certificates for TLS tests, made with the openssl command line tool."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, client_name: str = "gate-01") -> Pki:
    """Write a CA, a server certificate for 127.0.0.1 and a client certificate.

    Keys are P-256, valid for one day. Skips the test when openssl is missing.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install the Debian package openssl")
    folder.mkdir(parents=True)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    run("req", "-x509", *new_key, "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "1", "-subj", "/CN=facenet-test-ca")

    def issue(name: str, subject: str, extensions: str) -> tuple[Path, Path]:
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
        ext_file = folder / f"{name}.ext"
        ext_file.write_text(extensions + "\n")
        run("req", *new_key, "-keyout", str(key), "-out", str(csr), "-subj", subject)
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext_file))
        return cert, key

    server_cert, server_key = issue("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    client_cert, client_key = issue("client", f"/CN={client_name}",
                                    "extendedKeyUsage=clientAuth")
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)
