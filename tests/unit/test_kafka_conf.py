"""Settings -> client configuration for librdkafka and faust (dspex.streams.kafka)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from dspex.streams import kafka
from dspex.streams.settings import KafkaSettings


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dspex-test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9092")
    assert kafka.ssl_context(settings) is None
    assert kafka.sasl_credentials(settings) is None
    assert settings.to_librdkafka()["security.protocol"] == "PLAINTEXT"


def test_sasl_ssl_gives_every_library_the_same_credentials_and_ca(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = KafkaSettings(
        bootstrap_servers="127.0.0.1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="router",
        sasl_password=SecretStr("s3cret"),
        ssl_ca_location=cert,
        ssl_certificate_location=cert,
        ssl_key_location=key,
    )
    context = kafka.ssl_context(settings)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(ca["subject"] for ca in context.get_ca_certs())
    sasl = kafka.sasl_credentials(settings)
    assert sasl == kafka.SaslCredentials("SCRAM-SHA-512", "router", "s3cret")
    conf = settings.to_librdkafka()
    assert (conf["sasl.username"], conf["sasl.password"]) == ("router", "s3cret")
    assert conf["ssl.ca.location"] == str(cert)


def test_sasl_without_a_mechanism_defaults_to_plain() -> None:
    settings = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="u")
    credentials = kafka.sasl_credentials(settings)
    assert credentials == kafka.SaslCredentials("PLAIN", "u", None)
    assert kafka.ssl_context(settings) is None
