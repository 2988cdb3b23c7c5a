"""Mutual TLS between two agents: where the operator's certificates are, and the contexts.

Certificates are signed by the operator's CA in libvirt's PKI layout (:func:`tls_files`):
the destination accepts only clients whose certificate the CA signed; the source checks
the destination's certificate and its name (the host part of ``--to``, which must be in
the certificate's subjectAltName).  There is no plaintext mode.  Owns no state: each
context is made when a listener or a transfer starts, and a missing or unreadable file
is one sentence (Unavailable, PermissionDenied) for the operator.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from memd.errors import PermissionDenied, Unavailable


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def tls_files(tls_dir: str | Path | None, role: str) -> TlsFiles:
    """libvirt's layout: ``/etc/pki/CA/cacert.pem``, ``/etc/pki/libvirt/{role}cert.pem``,
    ``/etc/pki/libvirt/private/{role}key.pem``; with a directory, ``DIR/cacert.pem``,
    ``DIR/{role}cert.pem``, ``DIR/private/{role}key.pem`` (libvirt's per-user layout).
    *role* is ``server`` (the destination) or ``client`` (the source)."""
    if tls_dir is None:
        base, ca = Path("/etc/pki/libvirt"), Path("/etc/pki/CA/cacert.pem")
    else:
        base = Path(tls_dir)
        ca = base / "cacert.pem"
    return TlsFiles(ca, base / f"{role}cert.pem", base / "private" / f"{role}key.pem")


def _context(files: TlsFiles, purpose: ssl.Purpose) -> ssl.SSLContext:
    for what, path in (
        ("CA certificate", files.ca),
        ("certificate", files.cert),
        ("private key", files.key),
    ):
        if not path.is_file():
            raise Unavailable(
                f"migration TLS: the {what} {path} does not exist "
                "(see docs/operators.md, migration)",
                target=str(path),
            )
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except PermissionError as err:
        raise PermissionDenied(
            f"migration TLS: cannot read {err.filename}", target=str(err.filename)
        ) from None
    except ssl.SSLError as err:
        raise Unavailable(
            f"migration TLS: the files in {files.cert.parent} do not form a "
            f"certificate and its key ({err.reason})",
            target=str(files.cert),
        ) from None
    if not server:
        ctx.check_hostname = True
    return ctx


def server_context(tls_dir: str | Path | None) -> ssl.SSLContext:
    return _context(tls_files(tls_dir, "server"), ssl.Purpose.CLIENT_AUTH)


def client_context(tls_dir: str | Path | None) -> ssl.SSLContext:
    return _context(tls_files(tls_dir, "client"), ssl.Purpose.SERVER_AUTH)


def parse_address(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (port 0, a free one, only with *any_port*)."""
    host, sep, port = text.rpartition(":")
    least = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not least <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
