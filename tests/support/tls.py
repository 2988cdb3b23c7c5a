"""Migration certificates for tests, made by the product's own memd.migrate.pki.

:func:`make_pki` writes libvirt's per-directory layout (``cacert.pem``,
``servercert.pem``, ``private/serverkey.pem``, ``clientcert.pem``,
``private/clientkey.pem``) signed by a fresh CA (or the one given); the server
certificate names ``localhost`` and the addresses the destination listens on
(subjectAltName), which the source checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from memd.migrate import pki


def make_ca(where: Path, name: str = "memd test CA") -> Path:
    """A new CA in *where*; → that directory (what :func:`make_pki`'s *ca* takes)."""
    pki.make_ca(where, name=name, days=2)
    return where


def make_pki(
    where: Path,
    *,
    server_addresses: Sequence[str] = ("127.0.0.1",),
    ca: Path | None = None,
) -> Path:
    """A TLS directory for ``memd serve --tls-dir``; → *where*."""
    ca = ca or make_ca(where / "ca")
    pki.make_host(ca, where, "localhost", server_addresses, days=2)
    return where
