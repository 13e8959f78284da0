"""The secured local broker's material, and how librdkafka's security failures are named."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from cryptography import x509

from dspex.streams import kafka
from dspex.streams.errors import ConfigError
from dspex.streams.ops import _kraft, tls
from dspex.streams.ops.security import ADMIN, BROKER, SUPER_USERS, Material
from dspex.streams.settings import load_settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_material_is_made_once_with_private_files_owner_only(tmp_path: Path) -> None:
    material = Material(tmp_path)
    material.ensure()
    ca, password = material.ca.read_bytes(), material.password(ADMIN)
    assert len(password) >= 24
    for private in (material.ca_key, material.keystore, material.password_file(ADMIN)):
        assert _mode(private) == 0o600, private
    material.ensure()  # a restart keeps the CA that clients already trust
    assert material.ca.read_bytes() == ca and material.password(ADMIN) == password


def test_the_broker_certificate_is_signed_by_the_ca_for_127_0_0_1(tmp_path: Path) -> None:
    material = Material(tmp_path)
    material.ensure()
    ca = x509.load_pem_x509_certificate(material.ca.read_bytes())
    leaf = x509.load_pem_x509_certificate(material.keystore.read_bytes())
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert leaf.subject.rfc4514_string() == f"CN={BROKER}"
    assert b"PRIVATE KEY" in material.keystore.read_bytes()  # key + chain: a PEM key store


def test_server_properties_secure_every_listener_and_deny_by_default(tmp_path: Path) -> None:
    material = Material(tmp_path)
    material.ensure()
    text = _kraft.server_properties(
        tmp_path / "kraft", 9092, 9093,
        security=material.server_properties("127.0.0.1:9092", "127.0.0.1:9093", "127.0.0.1:9094"),
    )  # fmt: skip
    props = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    listeners = "SASL_SSL://127.0.0.1:9092,SSL://127.0.0.1:9094,CONTROLLER://127.0.0.1:9093"
    assert props["listeners"] == listeners
    assert props["listener.name.ssl.ssl.client.auth"] == "required"
    assert "PLAINTEXT" not in props["listener.security.protocol.map"]
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["super.users"] == ";".join(SUPER_USERS)
    assert props["ssl.keystore.type"] == "PEM"
    args = material.scram_args()
    assert args.count("--add-scram") == 2 and f"name={ADMIN}," in " ".join(args)


def test_a_password_file_feeds_librdkafka_and_faust_and_is_not_shown(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = load_settings(
        kafka={"bootstrap_servers": "b:9093", "security_protocol": "SASL_SSL",
               "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
               "sasl_password_file": secret},
    )  # fmt: skip
    assert settings.kafka.to_librdkafka()["sasl.password"] == "s3cret"
    credentials = kafka.sasl_credentials(settings.kafka)
    assert credentials is not None and credentials.password == "s3cret"  # noqa: S105
    assert "s3cret" not in settings.model_dump_json()


def test_a_password_and_a_password_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_settings(kafka={"sasl_password": "x", "sasl_password_file": tmp_path / "pw"})


def test_an_unreadable_password_file_names_the_setting(tmp_path: Path) -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": "b:9093", "sasl_password_file": tmp_path / "missing"}
    )
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password_file"):
        settings.kafka.to_librdkafka()


@pytest.mark.parametrize(
    ("code", "text", "protocol", "cause"),
    [
        (KafkaError._AUTHENTICATION, "b/bootstrap: SASL authentication error: invalid", "SASL_SSL",
         "credentials"),
        (None, "b/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN "
         "(after 1ms in state APIVERSION_QUERY)", "PLAINTEXT", "plaintext"),
        (KafkaError._SSL, "SSL handshake failed: error:0A000086:SSL routines::certificate verify "
         "failed", "SASL_SSL", "certificate"),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed", "SASL_SSL",
         "authorization"),
    ],
)  # fmt: skip
def test_security_failures_are_named(
    code: int | None, text: str, protocol: str, cause: str
) -> None:
    refused = kafka.classify(code, text, "b:9093", protocol)
    assert refused is not None and refused.cause == cause
    assert "b:9093" in str(refused)


def test_other_failures_are_not_refusals() -> None:
    assert kafka.classify(KafkaError._TRANSPORT, "Connection refused", "b", "SASL_SSL") is None
    # a TLS listener hanging up on a TLS client is not a plaintext mistake
    closed = "Disconnected (after 1ms in state APIVERSION_QUERY)"
    assert kafka.classify(None, closed, "b", "SASL_SSL") is None


def test_issue_cert_marks_client_and_server_use() -> None:
    ca = tls.issue_ca()
    leaf = x509.load_pem_x509_certificate(tls.issue_cert(ca, "client-1").cert_pem)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert len(list(usages)) == 2


def test_a_tenant_is_granted_its_two_topics_and_its_groups_only() -> None:
    from confluent_kafka.admin import AclOperation, ResourcePatternType, ResourceType

    from dspex.streams.ops.tenants import acl_bindings

    grants = {
        (b.restype, b.name, b.resource_pattern_type, b.operation, b.principal)
        for b in acl_bindings("acme", "dspex.")
    }
    who = "User:dspex-tenant-acme"
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    requests, responses = "dspex.tenant.acme.requests", "dspex.tenant.acme.responses"
    assert grants == {
        (ResourceType.TOPIC, requests, literal, AclOperation.WRITE, who),
        (ResourceType.TOPIC, requests, literal, AclOperation.DESCRIBE, who),
        (ResourceType.TOPIC, responses, literal, AclOperation.READ, who),
        (ResourceType.TOPIC, responses, literal, AclOperation.DESCRIBE, who),
        (ResourceType.GROUP, "dspex.tenant.acme.", prefixed, AclOperation.READ, who),
    }


def test_quota_tool_properties_carry_the_settings_credentials(tmp_path: Path) -> None:
    from dspex.streams.ops import quotas

    settings = load_settings(
        kafka={"bootstrap_servers": "b:9093", "security_protocol": "SASL_SSL",
               "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "ops",
               "sasl_password": "pw", "ssl_ca_location": tmp_path / "ca.pem"},
    )  # fmt: skip
    props = quotas.client_properties(settings)
    assert props["ssl.truststore.type"] == "PEM"
    assert 'username="ops" password="pw";' in props["sasl.jaas.config"]
    assert quotas._number(1_048_576.0) == "1048576" and quotas._number(12.5) == "12.5"


def test_payload_limits_agree() -> None:
    from dspex.streams.settings import MAX_MESSAGE_BYTES, RECORD_ENVELOPE_BYTES
    from dspex.streams.topics import CATALOG

    assert {spec.configs()["max.message.bytes"] for spec in CATALOG} == {str(MAX_MESSAGE_BYTES)}
    assert load_settings().router.max_request_bytes + RECORD_ENVELOPE_BYTES <= MAX_MESSAGE_BYTES
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_settings(router={"max_request_bytes": MAX_MESSAGE_BYTES})


def test_an_oversize_record_is_explained_as_an_invalid_request() -> None:
    from confluent_kafka import KafkaException

    from dspex.streams.errors import InvalidRequest

    error = kafka.explain(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
    assert isinstance(error, InvalidRequest) and error.field == "request"


@pytest.mark.parametrize("secure", [True, False])
def test_storage_of_the_other_kind_is_refused(tmp_path: Path, secure: bool) -> None:
    from dspex.streams.errors import LocalBrokerError
    from dspex.streams.ops.broker import LocalBroker
    from dspex.streams.settings import LocalBrokerSettings

    (tmp_path / "kraft").mkdir()
    (tmp_path / "kraft" / "meta.properties").write_text("node.id=1\n")
    if not secure:  # storage formatted secured, started plain
        Material(tmp_path).ensure()
    broker = LocalBroker(LocalBrokerSettings(data_dir=tmp_path, secure=secure))
    with pytest.raises(LocalBrokerError, match="--secure"):
        broker._check_security()


def test_dspex_settings_masks_the_sasl_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from dspex.streams.cli import app

    monkeypatch.setenv("DSPEX_KAFKA__SASL_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("DSPEX_KAFKA__SASL_USERNAME", "dspex-admin")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert "dspex-admin" in result.output
    assert "hunter2-very-secret" not in result.output and "**********" in result.output


def test_the_client_settings_files_load_as_dspex_settings(tmp_path: Path) -> None:
    material = Material(tmp_path)
    material.ensure()
    for name, text in material.client_settings("127.0.0.1:1", "127.0.0.1:2").items():
        (material.dir / name).write_text(text)
    sasl = load_settings(material.settings_file)
    assert (sasl.kafka.security_protocol, sasl.kafka.sasl_username) == ("SASL_SSL", ADMIN)
    assert sasl.kafka.password() is not None and sasl.local_broker.secure
    mtls = load_settings(material.mtls_settings_file)
    assert mtls.kafka.ssl_certificate_location == material.admin_cert
    assert mtls.local_broker.data_dir == tmp_path


def test_a_refusal_is_remembered_for_the_client_identity_that_met_it() -> None:
    base = {"bootstrap_servers": "b:9093", "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"}  # fmt: skip
    wrong = load_settings(kafka={**base, "sasl_password": "wrong"})
    right = load_settings(kafka={**base, "sasl_password": "right"})
    report = kafka.client_conf(wrong)["error_cb"]
    report(KafkaError(KafkaError._AUTHENTICATION, "b/bootstrap: SASL authentication error: no"))
    refused = kafka.refusal(wrong)
    assert refused is not None and refused.cause == "credentials"
    assert kafka.refusal(right) is None  # same cluster, other credentials: not its refusal
