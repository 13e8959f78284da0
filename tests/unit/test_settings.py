"""Settings: sources, priorities, validation errors, librdkafka mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspex.streams.errors import ConfigError
from dspex.streams.settings import LMBackend, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "DSPEX_SETTINGS_FILE"):
        monkeypatch.delenv(var, raising=False)


def test_defaults_need_no_configuration() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers is None
    assert settings.topics.prefix == "dspex."
    assert settings.pools.general.in_flight == 32
    assert settings.local_broker.kafka_version.startswith("4.")


def test_kafka_bootstrap_servers_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    assert load_settings().kafka.bootstrap_servers == "k1:9092,k2:9092"


def test_priority_env_over_file_and_partial_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dspex.toml"
    path.write_text(
        'log_level = "INFO"\n[kafka]\nbootstrap_servers = "file:9092"\n'
        "[pools.general]\nprocesses = 4\n"
    )
    monkeypatch.setenv("DSPEX_SETTINGS_FILE", str(path))
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "file:9092"
    assert settings.pools.general.processes == 4
    assert settings.pools.general.in_flight == 32  # the rest of the section keeps its default
    assert settings.log_level == "INFO"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "conventional:9092")
    assert load_settings().kafka.bootstrap_servers == "conventional:9092"
    monkeypatch.setenv("DSPEX_KAFKA__BOOTSTRAP_SERVERS", "dspex:9092")
    assert load_settings().kafka.bootstrap_servers == "dspex:9092"


def test_invalid_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_POOLS__GPU__IN_FLIGHT", "0")
    with pytest.raises(ConfigError, match=r"pools\.gpu\.in_flight"):
        load_settings()


def test_missing_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings file not found"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dspex.toml"
    path.write_text("[kafka]\nbootstrap_server = 'typo:9092'\n")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_settings(path)


def test_security_settings_reach_librdkafka_and_stay_secret() -> None:
    settings = load_settings(
        kafka={
            "bootstrap_servers": "b:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "app",
            "sasl_password": "s3cret",
            "ssl_ca_location": "/etc/ca.pem",
        }
    )
    conf = settings.kafka.to_librdkafka()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.password"] == "s3cret"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert "s3cret" not in settings.model_dump_json()
    assert "s3cret" not in repr(settings)


def test_no_bootstrap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        load_settings().kafka.to_librdkafka()


def test_configured_backends_keep_the_builtin_ones_and_variants_must_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DSPEX_LM__DEFAULT_VARIANT", raising=False)
    settings = load_settings(lm={"backends": {"gpt": {"model": "openai/gpt-4o-mini"}}})
    assert set(settings.lm.backends) == {"echo", "local", "gpt"}
    assert settings.lm.variant_for_pool("gpu") == "local"
    with pytest.raises(ConfigError, match=r"pool_variants\.general"):
        load_settings(lm={"pool_variants": {"general": "nope"}})


def test_every_pool_answers_with_a_real_model_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSPEX_LM__DEFAULT_VARIANT", raising=False)
    monkeypatch.delenv("DSPEX_LM__POOL_VARIANTS", raising=False)
    lm = load_settings().lm
    for pool in ("general", "optimizer", "gpu"):
        variant = lm.variant_for_pool(pool)
        assert variant == "local" and not lm.backends[variant].simulated
    assert lm.backends["echo"].simulated
    assert LMBackend(model="dspex/sim?task=upper").simulated
    assert not LMBackend(model="openai/gpt-4o-mini").simulated
