"""A throw-away certificate authority and a server certificate for 127.0.0.1,
made at run time, so the service reaches the fake STT over ``wss://`` with
TLS verification on: it trusts the CA through ``SSL_CERT_FILE``, which
Python's default SSL context reads (``ssl.create_default_context``).

Made with the ``cryptography`` package when it is installed (aiortc needs
it), else with the ``openssl`` command.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
VALID_DAYS = 2


@dataclass(frozen=True, slots=True)
class LocalTls:
    ca_file: Path
    """The CA certificate (PEM): what the client trusts."""
    cert_file: Path
    """The server's certificate (PEM), signed by the CA, for 127.0.0.1."""
    key_file: Path
    """The server's private key (PEM)."""


def make_local_tls(directory: Path) -> LocalTls:
    directory.mkdir(parents=True, exist_ok=True)
    tls = LocalTls(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _with_openssl(tls, directory)
    else:
        _with_cryptography(tls)
    return tls


def _with_cryptography(tls: LocalTls) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "live_transcription bench CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tls.key_file.chmod(0o600)


def _with_openssl(tls: LocalTls, directory: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither the cryptography package nor the openssl command is available")
    ca_key = directory / "ca-key.pem"
    ext = directory / "server.ext"
    ext.write_text(
        f"basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:{HOST}\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    csr = directory / "server.csr"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    days = str(VALID_DAYS)
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    run(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", days,
        "-subj", "/CN=live_transcription bench CA", "-out", str(tls.ca_file),
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(tls.key_file))
    run("req", "-new", "-key", str(tls.key_file), "-subj", f"/CN={HOST}", "-out", str(csr))
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(tls.ca_file), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", days, "-sha256", "-extfile", str(ext), "-out", str(tls.cert_file),
    )  # fmt: skip
    tls.key_file.chmod(0o600)
