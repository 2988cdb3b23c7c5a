"""Migration certificates for tests, made with the openssl command line.

:func:`make_pki` writes libvirt's per-directory layout (``cacert.pem``,
``servercert.pem``, ``private/serverkey.pem``, ``clientcert.pem``,
``private/clientkey.pem``) signed by a fresh CA; the server certificate names the
addresses the destination listens on (subjectAltName), which the source checks.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(where: Path, name: str = "memd test CA") -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    key, cert = where / "cakey.pem", where / "cacert.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=where,
    )
    return key, cert


def _signed(where: Path, role: str, ca: tuple[Path, Path], sans: Sequence[str]) -> None:
    private = where / "private"
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, csr, cert = private / f"{role}key.pem", where / f"{role}.csr", where / f"{role}cert.pem"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN=memd-{role}",
        cwd=where,
    )
    ext = where / f"{role}.ext"
    usage = "serverAuth" if role == "server" else "clientAuth"
    lines = [f"extendedKeyUsage={usage}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
        cwd=where,
    )


def make_pki(
    where: Path,
    *,
    server_addresses: Sequence[str] = ("127.0.0.1",),
    ca: tuple[Path, Path] | None = None,
) -> Path:
    """A TLS directory for ``memd serve --tls-dir``; → *where*."""
    ca = ca or make_ca(where / "ca")
    where.mkdir(parents=True, exist_ok=True)
    (where / "cacert.pem").write_bytes(ca[1].read_bytes())
    sans = [f"IP:{a}" for a in server_addresses] + ["DNS:localhost"]
    _signed(where, "server", ca, sans)
    _signed(where, "client", ca, [])
    return where
