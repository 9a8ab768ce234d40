"""Site secrets: CA, node certificates usable for mutual TLS, heartbeat keys."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node_service.cluster import pki
from node_service.errors import KeyFileError, UserError


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    pki.create_site(root / "site")
    pki.issue_node(root / "site", "lab-n1", root / "n1")
    pki.issue_node(root / "site", "lab-n2", root / "n2")
    return root


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_site_writes_ca_and_secret_with_private_modes(site):
    s = site / "site"
    assert sorted(os.listdir(s)) == ["ca.key", "ca.pem", "heartbeat.secret"]
    assert _mode(s / "ca.key") == 0o600
    assert _mode(s / "heartbeat.secret") == 0o600
    secret = (s / "heartbeat.secret").read_text().strip()
    assert len(bytes.fromhex(secret)) == 32
    ca = x509.load_pem_x509_certificate((s / "ca.pem").read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1


def test_create_site_refuses_to_overwrite(site):
    before = (site / "site" / "ca.key").read_bytes()
    with pytest.raises(UserError) as err:
        pki.create_site(site / "site")
    assert "refusing to overwrite" in str(err.value)
    assert "\n" not in str(err.value)
    assert (site / "site" / "ca.key").read_bytes() == before


def test_issue_node_gives_named_cert_signed_by_site_ca(site):
    n1 = site / "n1"
    assert sorted(os.listdir(n1)) == ["ca.pem", "heartbeat.secret", "node.key", "node.pem"]
    assert _mode(n1 / "node.key") == 0o600
    assert _mode(n1 / "heartbeat.secret") == 0o600
    assert (n1 / "heartbeat.secret").read_bytes() == (site / "site/heartbeat.secret").read_bytes()
    cert = x509.load_pem_x509_certificate((n1 / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((site / "site/ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lab-n1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lab-n1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(ca)
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(
        days=365 * 5
    )


def _handshake(server_ctx, client_ctx, hostname):
    """Run a real TLS handshake over a socket pair; return what each side saw."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)

    def serve():
        with server_ctx.wrap_socket(a, server_side=True) as tls:
            peer = tls.getpeercert()
            tls.sendall(b"ok")
            return peer

    def connect():
        with client_ctx.wrap_socket(b, server_hostname=hostname) as tls:
            peer = tls.getpeercert()
            return peer, tls.recv(2)

    with ThreadPoolExecutor(2) as pool:
        server = pool.submit(serve)
        client = pool.submit(connect)
        try:
            return server.result(timeout=15), client.result(timeout=15)
        finally:
            a.close()
            b.close()


def _cn(peercert) -> str:
    return dict(x[0] for x in peercert["subject"])["commonName"]


def test_node_certs_do_mutual_tls_with_site_ca_only(site):
    server_ctx = pki.tls_context(site / "n2", server=True)
    client_ctx = pki.tls_context(site / "n1", server=False)
    seen_by_server, (seen_by_client, data) = _handshake(server_ctx, client_ctx, "lab-n2")
    assert _cn(seen_by_server) == "lab-n1"
    assert _cn(seen_by_client) == "lab-n2"
    assert data == b"ok"


def test_tls_refuses_wrong_node_name(site):
    server_ctx = pki.tls_context(site / "n2", server=True)
    client_ctx = pki.tls_context(site / "n1", server=False)
    with pytest.raises((ssl.SSLError, ssl.CertificateError, ConnectionError)):
        _handshake(server_ctx, client_ctx, "lab-n3")


def test_tls_refuses_node_of_another_site(site, tmp_path):
    pki.create_site(tmp_path / "other")
    pki.issue_node(tmp_path / "other", "lab-n1", tmp_path / "intruder")
    server_ctx = pki.tls_context(site / "n2", server=True)
    client_ctx = pki.tls_context(tmp_path / "intruder", server=False)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(server_ctx, client_ctx, "lab-n2")


def test_heartbeat_key_is_per_module_and_per_secret(site, tmp_path):
    secret = pki.load_heartbeat_secret(site / "n1")
    assert secret == pki.load_heartbeat_secret(site / "n2")
    web = pki.heartbeat_key(secret, "web")
    assert len(web) == 32
    assert web == pki.heartbeat_key(secret, "web")
    assert web != pki.heartbeat_key(secret, "db")
    pki.create_site(tmp_path / "other")
    assert web != pki.heartbeat_key(pki.load_heartbeat_secret(tmp_path / "other"), "web")


def test_issue_node_without_site_is_one_line_error(tmp_path):
    with pytest.raises(KeyFileError) as err:
        pki.issue_node(tmp_path / "nothing", "lab-n1", tmp_path / "n1")
    assert "missing" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "n1").exists()


def test_issue_node_refuses_bad_node_name(site, tmp_path):
    with pytest.raises(UserError, match="not usable in a certificate"):
        pki.issue_node(site / "site", "bad name/1", tmp_path / "n")


def test_corrupt_secret_is_reported(tmp_path):
    (tmp_path / "heartbeat.secret").write_text("not hex at all\n")
    with pytest.raises(KeyFileError, match="not a hex heartbeat secret"):
        pki.load_heartbeat_secret(tmp_path)
