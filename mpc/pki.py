"""A federation's public-key infrastructure: one CA, one key and certificate per party.

Layout of a federation folder (``medmpc pki init``, or an ephemeral one per run)::

    ca.pem            the federation CA's certificate (every party trusts it, and only it)
    ca.key            the CA's key (only where certificates are issued or revoked; 0600)
    crl.pem           the CA's certificate revocation list (every party loads it)
    <party>.pem/.key  each party's certificate and key, e.g. hospital0, aggregator1, coordinator

A party certificate names the party in its common name and its role in the organisational
unit (``CN=hospital0, OU=hospital``), as provisioning kits do. Each side of a TLS 1.3
connection checks the other's certificate against the CA and the CRL (unknown CA, expired,
revoked, or none: the handshake fails) and then that its common name is the party it
expected (:func:`peer_name`), before any share is exchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_CERT, CA_KEY, CRL = "ca.pem", "ca.key", "crl.pem"


class IdentityError(ValueError):
    """Credentials are missing or do not name the party they should."""


def describe_channels(*, plaintext: bool) -> str:
    """What every output made by a run says about its channels."""
    if plaintext:
        return "plaintext TCP (measurement only: every share crossed the network in the clear)"
    return "TLS 1.3, mutually authenticated (federation CA)"


def role_of(party: str) -> str:
    """``hospital0`` -> ``hospital``: the role is the party's name without its index."""
    return party.rstrip("0123456789")


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (folder / CA_KEY).is_file():
        raise IdentityError(f"{folder}: no CA key ({CA_KEY}); certificates are issued where the CA key is kept")
    cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _self_issued(
    name: x509.Name, key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime, not_after: datetime.datetime
) -> x509.CertificateBuilder:
    """A certificate of ``key`` that names itself as its issuer (a CA's own, or a self-signed one)."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def init_federation(folder: Path, parties: Iterable[str], *, days: float = 365.0, keep_ca_key: bool = True) -> None:
    """A new CA in ``folder`` (which must not hold one), an empty CRL, and a certificate for each
    party. ``keep_ca_key=False`` (ephemeral runs) never writes the CA key: nothing more can be
    issued or revoked."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CA_CERT).exists():
        raise IdentityError(f"{folder} already holds a federation CA ({CA_CERT}); use another folder")
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("medmpc federation CA", "ca")
    cert = (
        _self_issued(name, key, now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(key, hashes.SHA256())
    )
    (folder / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(folder, cert, key, revoked=[])
    for party in parties:
        issue(folder, party, days=days, ca=(cert, key))
    if keep_ca_key:
        _write_key(key, folder / CA_KEY)


def issue(
    folder: Path,
    party: str,
    *,
    days: float = 365.0,
    not_before: datetime.datetime | None = None,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    addresses: Sequence[str] = (),
) -> None:
    """Key and certificate for ``party`` (``<party>.key``, ``<party>.pem``), valid ``days`` from
    ``not_before`` (default now). ``addresses`` (IP addresses or DNS names) go into its subject
    alternative names, so that the same certificate serves HTTPS at those addresses."""
    if not party or role_of(party) == "" or not party.replace("-", "").isalnum():
        raise IdentityError(f"party names are a role and an optional index, like hospital0; got {party!r}")
    ca_cert, ca_key = ca or _load_ca(folder)
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(party, role_of(party)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if addresses:
        cert = cert.add_extension(x509.SubjectAlternativeName([_alt_name(a) for a in addresses]), critical=False)
    signed = cert.sign(ca_key, hashes.SHA256())
    (folder / f"{party}.pem").write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{party}.key")


def self_signed(folder: Path, addresses: Sequence[str], *, days: float = 1.0) -> tuple[Path, Path]:
    """An HTTPS certificate for ``addresses`` that is its own CA, and its key: ``folder/https.pem``
    and ``https.key``. For a front end whose clients are handed this certificate to trust (tests,
    load tests); a deployment's front end has a certificate from a CA its clients already trust."""
    if not addresses:
        raise IdentityError("a certificate for no address")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    cert = (
        _self_issued(name, key, start, start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alt_name(a) for a in addresses]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "https.pem", folder / "https.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_file)
    return cert_file, key_file


def _alt_name(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", address):
            raise IdentityError(f"{address!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(address)


def revoke(folder: Path, party: str) -> None:
    """Add ``party``'s certificate to the CRL: every party that loads the new ``crl.pem`` refuses it."""
    ca_cert, ca_key = _load_ca(folder)
    cert = x509.load_pem_x509_certificate((folder / f"{party}.pem").read_bytes())
    crl = x509.load_pem_x509_crl((folder / CRL).read_bytes())
    _write_crl(folder, ca_cert, ca_key, revoked=[*(r.serial_number for r in crl), cert.serial_number])


def _write_crl(folder: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, revoked: list[int]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=365))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    (folder / CRL).write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Identity:
    """One party's credentials in a federation folder: TLS 1.3 contexts that require and check a
    certificate from the federation CA on the other side."""

    folder: Path
    party: str

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        cert, key = self.folder / f"{self.party}.pem", self.folder / f"{self.party}.key"
        for path in (self.folder / CA_CERT, self.folder / CRL, cert, key):
            if not path.is_file():
                raise IdentityError(f"{self.party}: missing {path} (create a federation with `medmpc pki init`)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the peer's identity is its certificate's name, checked by peer_name()
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=self.folder / CA_CERT)
        ctx.load_verify_locations(cafile=self.folder / CRL)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.load_cert_chain(cert, key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)


def peer_name(sock: ssl.SSLSocket) -> str:
    """The common name of the verified certificate the peer presented."""
    subject: Any = (sock.getpeercert() or {}).get("subject", ())  # ((("commonName", "x"),), ...)
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return str(names[0]) if names else ""
