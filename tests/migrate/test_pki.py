"""memd tls-init: the certificates it makes pass memd's own TLS contexts in a real handshake
(and the wrong ones do not), it never replaces a file, and every operator mistake is one
sentence."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from memd.cli import main
from memd.errors import InvalidArgument, MemdError
from memd.migrate import pki, tls

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("pki") / "ca"
    pki.make_ca(where, days=2)
    return where


def handshake(
    server_dir: Path, client_dir: Path, name: str, server_errors: list[str] | None = None
) -> None:
    """A TLS connection on 127.0.0.1 between memd's server context (the destination's
    files) and its client context (the source's), the client checking *name*; raises
    what the client's handshake raised; the server's errors go to *server_errors* (none
    are allowed without it)."""
    server_ctx, client_ctx = tls.server_context(server_dir), tls.client_context(client_dir)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server_error: list[str] = [] if server_errors is None else server_errors

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.sendall(tls_conn.recv(5))
            except (OSError, ssl.SSLError) as err:
                server_error.append(str(err))

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=name) as conn,
            ):
                conn.sendall(b"hello")
                assert conn.recv(5) == b"hello"
        finally:
            thread.join(10)
        assert server_errors is not None or not server_error, server_error


def test_a_new_ca_has_its_key_private(ca: Path) -> None:
    assert (ca / "cacert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert mode(ca / "cakey.pem") == 0o600
    assert mode(ca) == 0o700
    assert sorted(p.name for p in ca.iterdir()) == ["cacert.pem", "cakey.pem"]  # no scratch


def test_a_second_ca_in_the_same_directory_is_refused_and_the_first_kept(ca: Path) -> None:
    before = snapshot(ca)
    with pytest.raises(InvalidArgument, match=r"cacert\.pem already exists: .* never replaces"):
        pki.make_ca(ca)
    assert snapshot(ca) == before


def test_host_files_are_accepted_by_memds_contexts_for_every_name_they_carry(
    ca: Path, tmp_path: Path
) -> None:
    out = tmp_path / "host2"
    files = pki.make_host(ca, out, "host2.example", ["127.0.0.1", "::1"], days=2)
    server, client = tls.tls_files(out, "server"), tls.tls_files(out, "client")
    assert set(files.values()) == {server.ca, server.cert, server.key, client.cert, client.key}
    assert mode(out / "private") == 0o700
    assert mode(out / "private" / "serverkey.pem") == mode(out / "private" / "clientkey.pem")
    assert mode(out / "private" / "serverkey.pem") == 0o600
    assert (out / "cacert.pem").read_bytes() == (ca / "cacert.pem").read_bytes()
    for name in ("127.0.0.1", "host2.example"):
        handshake(out, out, name)


def test_a_server_certificate_for_another_host_is_refused(ca: Path, tmp_path: Path) -> None:
    other = pki.make_host(ca, tmp_path / "other", "host3.example", ["10.9.9.9"], days=2)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"IP address mismatch"):
        handshake(other["ca"].parent, other["ca"].parent, "127.0.0.1")


def test_a_client_of_another_ca_is_refused(ca: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    pki.make_host(ca, dest, "localhost", ["127.0.0.1"], days=2)
    rogue_ca = tmp_path / "rogue-ca"
    pki.make_ca(rogue_ca, name="rogue", days=2)
    rogue = tmp_path / "rogue"
    pki.make_host(rogue_ca, rogue, "localhost", ["127.0.0.1"], days=2)
    (rogue / "cacert.pem").write_bytes((ca / "cacert.pem").read_bytes())  # trusts dest
    refused: list[str] = []
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(dest, rogue, "127.0.0.1", refused)
    assert "certificate verify failed" in str(refused)


def test_host_files_go_beside_the_ca_and_are_never_replaced(ca: Path, tmp_path: Path) -> None:
    own = tmp_path / "own-ca"
    pki.make_ca(own, days=2)
    pki.make_host(own, own, "localhost", ["127.0.0.1"], days=2)  # same cacert.pem: kept
    handshake(own, own, "localhost")
    before = snapshot(own)
    with pytest.raises(InvalidArgument, match=r"servercert\.pem already exists"):
        pki.make_host(own, own, "localhost", ["127.0.0.1"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "cacert.pem").write_text("another CA\n")
    with pytest.raises(InvalidArgument, match=r"cacert\.pem already exists"):
        pki.make_host(ca, out, "localhost")
    assert snapshot(own) == before
    assert snapshot(out) == {str(out / "cacert.pem"): b"another CA\n"}


def test_names_become_subject_alt_names_and_nonsense_is_named() -> None:
    assert pki.subject_alt_names(["host2.Example.", "10.0.0.2", "[fd00::2]", "10.0.0.2"]) == [
        "DNS:host2.example",
        "IP:10.0.0.2",
        "IP:fd00::2",
    ]
    for bad in ("two words", "", "-lead.example", "x" * 64, "a/b"):
        with pytest.raises(InvalidArgument, match="neither an IP address nor a DNS name"):
            pki.subject_alt_names([bad])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_makes_a_ca_then_a_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca, out = tmp_path / "ca", tmp_path / "host2"
    code, text, err = run_cli(capsys, "tls-init", "--ca", str(ca))
    assert (code, err) == (0, "") and "made a CA" in text
    code, text, err = run_cli(
        capsys, "tls-init", "--ca", str(ca), "--host", "127.0.0.1", "--addr", "::1,h2", "--out",
        str(out), "--json",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert '"subject_alt_names": [\n    "IP:127.0.0.1",\n    "IP:::1",\n    "DNS:h2"' in text
    handshake(out, out, "127.0.0.1")


@pytest.mark.parametrize(
    ("argv", "sentence"),
    [
        (["--ca", "{tmp}/none", "--host", "h", "--out", "{tmp}/o"], "no CA in {tmp}/none: "),
        (["--ca", "{tmp}/ca"], "{tmp}/ca/cacert.pem already exists"),
        (["--ca", "{tmp}/ca", "--host", "h", "--addr", "1.2.3", "--out", "{tmp}/o"], "'1.2.3' is"),
        (["--ca", "{tmp}/ca", "--host", "h"], "--host needs --out DIR"),
        (["--ca", "{tmp}/ca", "--addr", "10.0.0.1"], "--addr and --out go with --host"),
        (["--ca", "{tmp}/ca", "--days", "0"], "--days must be"),
    ],
)
def test_cli_mistakes_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], sentence: str
) -> None:
    pki.make_ca(tmp_path / "ca", days=2)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "tls-init", *(a.format(tmp=tmp_path) for a in argv))
    assert code == 1 and out == ""
    assert err.startswith("memd: " + sentence.format(tmp=tmp_path)), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_cli_without_openssl_says_so_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run_cli(capsys, "tls-init", "--ca", str(tmp_path / "ca"))
    assert code == 1
    assert err == (
        "memd: the openssl command is not installed (apt install openssl): "
        "memd runs it to make keys and certificates\n"
    )
    assert not (tmp_path / "ca").exists()


def test_a_file_in_the_way_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(MemdError, match=r"/file/ca is not a directory|/file is not a directory"):
        pki.make_ca(tmp_path / "file" / "ca")
