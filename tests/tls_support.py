"""Throw-away X.509 certificates for tests (the ``cryptography`` package): a CA, server and client certificates
signed by it, and a second, unrelated CA for "untrusted" cases. Every file is PEM, unencrypted.

Used by the Kafka harness (broker SSL / SASL_SSL listeners, PEM key stores) and by the OTLP TLS tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    """A certificate (``cert``, PEM, leaf first then the issuing CA) and its private key (``key``, PKCS#8 PEM);
    ``pem`` holds both in one file (key first), the form Kafka's ``ssl.keystore.type=PEM`` reads."""

    cert: Path
    key: Path
    pem: Path


@dataclass(frozen=True)
class Pki:
    """``ca``: the trusted CA certificate file; ``server`` (SAN 127.0.0.1, ::1, localhost); ``client`` (client
    authentication, CN ``client``); ``other_ca`` / ``other_server`` / ``other_client``: signed by an unrelated CA;
    ``wrong_host``: signed by ``ca`` but only valid for ``wrong.example`` (hostname verification must refuse it);
    ``ca_key``: the CA's private key, to issue more certificates (:func:`renew`)."""

    ca: Path
    ca_key: Path
    server: CertFiles
    client: CertFiles
    other_ca: Path
    other_server: CertFiles
    other_client: CertFiles
    wrong_host: CertFiles


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, *, hosts: tuple[str, ...] = (),
          client: bool = False, days: float = 2.0) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for ``cn`` signed by ``ca``: server authentication for ``hosts`` (IPs or DNS names), or
    client authentication when ``client``."""
    ca_cert, ca_key = ca
    key = _key()
    now = _now()
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                     else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate) -> CertFiles:
    """Write ``<name>.crt`` (leaf + CA), ``<name>.key`` and ``<name>.pem`` (key + chain) under ``directory``."""
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.pem")
    files.cert.write_bytes(chain)
    files.key.write_bytes(key_pem)
    files.key.chmod(0o600)
    files.pem.write_bytes(key_pem + chain)
    files.pem.chmod(0o600)
    return files


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> Pki:
    """Generate the whole set under ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("trace-source test CA")
    other = _ca("unrelated test CA")
    ca_file, other_file = directory / "ca.crt", directory / "other-ca.crt"
    ca_file.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    ca_key = directory / "ca.key"
    ca_key.write_bytes(ca[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    other_file.write_bytes(other[0].public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca_file,
        ca_key=ca_key,
        server=write(directory, "server", *issue(ca, "server", hosts=hosts), ca[0]),
        client=write(directory, "client", *issue(ca, "client", client=True), ca[0]),
        other_ca=other_file,
        other_server=write(directory, "other-server", *issue(other, "server", hosts=hosts), other[0]),
        other_client=write(directory, "other-client", *issue(other, "client", client=True), other[0]),
        wrong_host=write(directory, "wrong-host", *issue(ca, "wrong", hosts=("wrong.example",)), ca[0]),
    )


def renew(pki: Pki, directory: Path, name: str = "server",
          hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> CertFiles:
    """A new server certificate (new key, new serial) from ``pki``'s CA, as a renewal by cert-manager would be."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    directory.mkdir(parents=True, exist_ok=True)
    return write(directory, name, *issue((ca_cert, ca_key), name, hosts=hosts), ca_cert)
