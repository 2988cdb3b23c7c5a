"""The operator's migration certificates: a CA, and per host the files memd.migrate.tls reads.

Overview.  ``memd tls-init`` (and the tests and benchmarks, which need the same files)
make them here by running the ``openssl`` command line, so memd needs no crypto library
of its own:

    make_ca(DIR)                 DIR/cacert.pem, DIR/cakey.pem (0600): a CA for memd's
                                 agents (any CA works: libvirt's certtool recipe, a
                                 company CA; these are only the files)
    make_host(CA, OUT, host, names)
                                 OUT/cacert.pem, OUT/servercert.pem,
                                 OUT/private/serverkey.pem, OUT/clientcert.pem,
                                 OUT/private/clientkey.pem (keys 0600, private/ 0700):
                                 libvirt's per-directory layout (``--tls-dir OUT``); the
                                 server certificate names every address and DNS name in
                                 its subjectAltName, which the source checks against
                                 the host part of ``memd migrate --to``

Nothing is ever overwritten: every file is made in a scratch directory beside its final
place and hard-linked there, which fails if the name exists (a second run, or a race
with another, leaves the first files whole).  Every operator mistake is one
:class:`~memd.errors.MemdError` sentence.  No state, no threads.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memd.errors import BackendError, InvalidArgument, NotFound, PermissionDenied, Unavailable

#: A CA outlives many host certificates; a host certificate is renewed with its host.
CA_DAYS = 3650
HOST_DAYS = 825
#: P-256: what libvirt's GnuTLS, QEMU and Python's ssl all accept, and quick to make.
_KEY_ARGS = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
#: A DNS name: dot-separated labels of letters, digits and inner hyphens.
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class CaFiles:
    cert: Path
    key: Path


def ca_files(ca_dir: str | Path) -> CaFiles:
    base = Path(ca_dir)
    return CaFiles(base / "cacert.pem", base / "cakey.pem")


def host_files(out_dir: str | Path) -> dict[str, Path]:
    """The --tls-dir layout (memd.migrate.tls.tls_files), by what each file is."""
    base = Path(out_dir)
    return {
        "ca": base / "cacert.pem",
        "server_cert": base / "servercert.pem",
        "server_key": base / "private" / "serverkey.pem",
        "client_cert": base / "clientcert.pem",
        "client_key": base / "private" / "clientkey.pem",
    }


def subject_alt_names(names: Sequence[str]) -> list[str]:
    """``10.0.0.2``, ``fd00::2``, ``host2.example`` → ``IP:…`` / ``DNS:…`` entries, in order,
    without repeats; anything else is the operator's mistake, named."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().strip("[]")
        try:
            entry = f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            labels = name.rstrip(".").split(".")
            if (
                not name
                or len(name) > 253
                or not all(_DNS_LABEL.fullmatch(x) for x in labels)
                or labels[-1].isdigit()  # 10.0.0 is a mistyped address, not a name
            ):
                raise InvalidArgument(
                    f"{raw!r} is neither an IP address nor a DNS name "
                    "(the destination's certificate must name what `memd migrate --to` uses)"
                ) from None
            entry = f"DNS:{name.rstrip('.').lower()}"
        if entry not in out:
            out.append(entry)
    return out


def make_ca(ca_dir: str | Path, *, name: str = "memd migration CA", days: int = CA_DAYS) -> CaFiles:
    """A new CA in *ca_dir* (made 0700 if it does not exist); refuses to replace one."""
    files = ca_files(ca_dir)
    _refuse_existing([files.cert, files.key])
    _openssl_command()  # before making any directory
    base = _make_dir(Path(ca_dir), 0o700)
    with _scratch(base) as scratch:
        tmp = Path(scratch)
        _openssl(
            "req",
            "-x509",
            *_KEY_ARGS,
            "-keyout",
            "cakey.pem",
            "-out",
            "cacert.pem",
            "-days",
            str(days),
            "-subj",
            f"/CN={_subject(name)}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=tmp,
            making=files.cert,
        )
        _place(tmp / "cakey.pem", files.key, 0o600)
        _place(tmp / "cacert.pem", files.cert, 0o644)
    return files


def make_host(
    ca_dir: str | Path,
    out_dir: str | Path,
    host: str,
    names: Sequence[str] = (),
    *,
    days: int = HOST_DAYS,
) -> dict[str, Path]:
    """A server certificate naming *host* and *names* (addresses or DNS names) and a
    client certificate for *host*, signed by the CA in *ca_dir*, with the CA's
    certificate, in *out_dir*'s --tls-dir layout.  → :func:`host_files`.

    *out_dir* may already hold the same CA certificate (the CA's own directory, or a
    second run for a host whose certificates were removed); any other file there is
    refused, never replaced."""
    ca = ca_files(ca_dir)
    for path in (ca.cert, ca.key):
        if not path.is_file():
            raise NotFound(
                f"no CA in {ca_dir}: {path.name} is missing (make one with "
                f"`memd tls-init --ca {ca_dir}`, or give the directory of yours)",
                target=str(path),
            )
    sans = subject_alt_names([host, *names])
    files = host_files(out_dir)
    _read(ca.key)  # unreadable (another user's CA): one sentence, not openssl's
    ca_pem = _read(ca.cert)
    copy_ca = not (files["ca"].is_file() and _read(files["ca"]) == ca_pem)
    _refuse_existing([p for k, p in files.items() if k != "ca" or copy_ca])
    _openssl_command()
    base = _make_dir(Path(out_dir), 0o755)
    private = _make_dir(base / "private", 0o700)
    with _scratch(base) as scratch:
        tmp = Path(scratch)
        for role, usage, alt in (("server", "serverAuth", sans), ("client", "clientAuth", [])):
            _signed(tmp, role, usage, alt, host, ca, days)
        _place(tmp / "serverkey.pem", private / "serverkey.pem", 0o600)
        _place(tmp / "clientkey.pem", private / "clientkey.pem", 0o600)
        _place(tmp / "servercert.pem", files["server_cert"], 0o644)
        _place(tmp / "clientcert.pem", files["client_cert"], 0o644)
        if copy_ca:
            (tmp / "cacert.pem").write_bytes(ca_pem)
            _place(tmp / "cacert.pem", files["ca"], 0o644)
    return files


def _signed(
    tmp: Path, role: str, usage: str, sans: Sequence[str], host: str, ca: CaFiles, days: int
) -> None:
    """tmp/{role}key.pem and tmp/{role}cert.pem, signed by *ca*."""
    _openssl(
        "req",
        *_KEY_ARGS,
        "-keyout",
        f"{role}key.pem",
        "-out",
        f"{role}.csr",
        "-subj",
        f"/CN={_subject(host)}",
        cwd=tmp,
        making=tmp / f"{role}cert.pem",
    )
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",  # an EC key signs; it never enciphers
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (tmp / f"{role}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{role}.csr",
        "-CA",
        str(ca.cert.resolve()),
        "-CAkey",
        str(ca.key.resolve()),
        # a random serial: -CAcreateserial would write a serial file into the CA's directory
        "-set_serial",
        f"0x{secrets.token_hex(16)}",
        "-days",
        str(days),
        "-extfile",
        f"{role}.ext",
        "-out",
        f"{role}cert.pem",
        cwd=tmp,
        making=tmp / f"{role}cert.pem",
    )


def _openssl_command() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise Unavailable(
            "the openssl command is not installed (apt install openssl): "
            "memd runs it to make keys and certificates",
            target="openssl",
        )
    return exe


def _openssl(*args: str, cwd: Path, making: Path) -> None:
    done = subprocess.run(
        [_openssl_command(), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise BackendError(f"openssl could not make {making.name}: {why}", target=str(making))


def _subject(name: str) -> str:
    """A name fit for ``-subj /CN=…`` (its separators would start another field)."""
    cleaned = re.sub(r"[/\\=+,\n\r]", "-", name).strip()
    return cleaned[:64] or "memd"


def _refuse_existing(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise InvalidArgument(
                f"{path} already exists: memd tls-init never replaces a key or certificate "
                "(move the old files away first, or choose another directory)"
            )


def _make_dir(path: Path, mode: int) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except PermissionError:
        raise PermissionDenied(
            f"cannot create {path}: permission denied", target=str(path)
        ) from None
    except (FileExistsError, NotADirectoryError):
        raise InvalidArgument(f"{path} is not a directory (a file is in the way)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionDenied(f"cannot write in {path}: permission denied", target=str(path))
    return path


def _scratch(base: Path) -> tempfile.TemporaryDirectory[str]:
    """A private directory inside *base* (same file system: files are linked from it to
    their places), removed on exit whatever happened."""
    return tempfile.TemporaryDirectory(prefix=".tls-init-", dir=base)


def _place(made: Path, final: Path, mode: int) -> None:
    """Move *made* to *final* with *mode*, failing (not replacing) if *final* exists."""
    os.chmod(made, mode)
    try:
        os.link(made, final)
    except FileExistsError:
        _refuse_existing([final])
    except PermissionError:
        raise PermissionDenied(
            f"cannot write {final}: permission denied", target=str(final)
        ) from None
    os.unlink(made)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}: permission denied", target=str(path)) from None
