"""Site secrets: the site CA, node certificates and the heartbeat secret.

The console creates a site once (``create_site``) and issues each node its own
certificate (``issue_node``) into the node's ``/etc/rampart/site/``. Two uses:

- replication runs over mutual TLS where the site CA is the only trust anchor
  and a node's certificate names the node (CN and SAN DNS);
- heartbeats are authenticated with HMAC keys derived per module from the
  heartbeat secret (``heartbeat_key``), so one module's key never
  authenticates another module's packets.

Certificates use ECDSA P-256 rather than Ed25519 because Python's ssl module
and the OpenSSL builds it meets do not all accept Ed25519 certificates for TLS.
"""

from __future__ import annotations

import datetime
import os
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node_service.errors import KeyFileError, UserError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
HEARTBEAT_SECRET = "heartbeat.secret"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"

CA_YEARS = 10
NODE_YEARS = 10
SECRET_BYTES = 32
# Domain separation: the same site secret could one day key other things.
HEARTBEAT_INFO_PREFIX = b"rampart heartbeat v1 module="


class SiteError(UserError):
    """A site directory cannot be created or used as asked."""


def create_site(dest_dir: str | os.PathLike[str]) -> None:
    """Write a new site CA and heartbeat secret into ``dest_dir``.

    Refuses when any site file is already there: replacing a site's secrets
    silently would cut every node of that site off from the others.
    """
    dest = Path(dest_dir)
    existing = [n for n in (CA_CERT, CA_KEY, HEARTBEAT_SECRET) if (dest / n).exists()]
    if existing:
        raise SiteError(
            f"{dest}: a site already exists here ({existing[0]} present); "
            "refusing to overwrite its secrets, choose an empty directory"
        )
    dest.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Rampart site CA {dest.name}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_secret(dest / CA_KEY, _key_pem(key))
    _write_secret(dest / HEARTBEAT_SECRET, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
    _write_public(dest / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))


def issue_node(
    site_dir: str | os.PathLike[str], node_name: str, dest_dir: str | os.PathLike[str]
) -> None:
    """Give node ``node_name`` its site files in ``dest_dir`` (its /etc/rampart/site/).

    Re-issuing into the same directory replaces the node's certificate: that is
    how a node's key is rotated.
    """
    site = Path(site_dir)
    dest = Path(dest_dir)
    _check_node_name(node_name)
    ca_cert = _load_cert(site / CA_CERT)
    ca_key = _load_ca_key(site / CA_KEY)
    load_heartbeat_secret(site)  # refuse a broken site before issuing anything
    secret_text = (site / HEARTBEAT_SECRET).read_bytes()

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=365 * NODE_YEARS), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_name)]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    dest.mkdir(parents=True, exist_ok=True)
    _write_secret(dest / NODE_KEY, _key_pem(key))
    _write_public(dest / NODE_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(dest / CA_CERT, (site / CA_CERT).read_bytes())
    _write_secret(dest / HEARTBEAT_SECRET, secret_text)


def heartbeat_key(secret: bytes, module: str) -> bytes:
    """The 32-byte HMAC key of ``module``'s heartbeats, derived from the site secret."""
    if not secret:
        raise KeyFileError("heartbeat secret is empty; re-issue the node's site files")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=HEARTBEAT_INFO_PREFIX + module.encode("utf-8"),
    ).derive(secret)


def load_heartbeat_secret(site_dir: str | os.PathLike[str]) -> bytes:
    """The raw site secret from ``site_dir/heartbeat.secret`` (stored as hex)."""
    path = Path(site_dir) / HEARTBEAT_SECRET
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing; issue this node's site files first") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    return _parse_secret(text, path)


def tls_context(site_dir: str | os.PathLike[str], *, server: bool) -> ssl.SSLContext:
    """A mutual-TLS context for this node: its own certificate, the site CA only.

    Clients must pass ``server_hostname=<peer node name>``: the peer's
    certificate must name the node we meant to reach.
    """
    site = Path(site_dir)
    for name in (CA_CERT, NODE_CERT, NODE_KEY):
        if not (site / name).exists():
            raise KeyFileError(f"{site / name}: missing; issue this node's site files first")
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=str(site / CA_CERT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(site / NODE_CERT), str(site / NODE_KEY))
    except ssl.SSLError as exc:
        raise KeyFileError(f"{site / NODE_CERT}: unusable node certificate: {exc.reason}") from None
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _check_node_name(node_name: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
    if not node_name or len(node_name) > 63 or not set(node_name) <= allowed:
        raise SiteError(
            f"node name {node_name!r} is not usable in a certificate; "
            "expected 1-63 letters, digits, '-' or '.'"
        )


def _parse_secret(text: bytes, path: Path) -> bytes:
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{path}: not a hex heartbeat secret") from None
    if len(secret) < 16:
        raise KeyFileError(f"{path}: heartbeat secret too short ({len(secret)} bytes, expected 32)")
    return secret


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing; is {path.parent} a site directory?") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM certificate") from None


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing; the site CA key stays on the console") from None
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: expected an ECDSA P-256 site CA key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_secret(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode so a secret is never readable, even briefly;
    # renamed into place so a crash never leaves half a key.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


__all__ = [
    "SiteError",
    "create_site",
    "heartbeat_key",
    "issue_node",
    "load_heartbeat_secret",
    "tls_context",
]
