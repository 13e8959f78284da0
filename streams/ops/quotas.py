"""Kafka client quotas per user, through Kafka's own admin tool.

confluent-kafka (2.16) has no ``AlterClientQuotas``/``DescribeClientQuotas``, so
these run ``kafka.admin.ConfigCommand`` (``kafka-configs.sh``) from the jars the
local broker uses (fetched once with Maven, :meth:`LocalBroker.ensure_jars`); it
calls the Admin API's ``alterClientQuotas`` and ``describeClientQuotas``. It
connects with the settings' credentials, written for the JVM to a ``0600``
temporary file that is removed afterwards. Supported: PLAINTEXT, SSL (CA only)
and SASL PLAIN/SCRAM over either; not OAUTHBEARER or client certificates.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from dspex.streams import kafka
from dspex.streams.errors import ConfigError, DSPexError
from dspex.streams.ops import _kraft, tls
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.settings import Settings

KEYS = ("producer_byte_rate", "consumer_byte_rate", "request_percentage")
"""The quotas DSPex sets per tenant (bytes/s produced, bytes/s fetched, % of broker threads)."""
TIMEOUT_S = 180.0
_LINE = re.compile(r"Quota configs for user-principal '([^']+)' are (.*)")
_LOGINS = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def alter(settings: Settings, user: str, quotas: Mapping[str, float]) -> None:
    """Set ``quotas`` (keys from :data:`KEYS`) for SASL user ``user``."""
    unknown = sorted(set(quotas) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown quota(s) {unknown}; known: {list(KEYS)}")
    if quotas:
        pairs = ",".join(f"{key}={_number(value)}" for key, value in quotas.items())
        _run(settings, "--alter", "--add-config", pairs, *_user(user))


def delete(settings: Settings, user: str) -> None:
    """Remove every quota of ``user`` (quotas it does not have are ignored)."""
    current = describe(settings).get(user, {})
    if current:
        _run(settings, "--alter", "--delete-config", ",".join(current), *_user(user))


def describe(settings: Settings) -> dict[str, dict[str, float]]:
    """``{user: {quota: value}}`` for every user with a quota (Admin ``describeClientQuotas``)."""
    found: dict[str, dict[str, float]] = {}
    for line in _run(settings, "--describe", "--entity-type", "users").splitlines():
        match = _LINE.match(line.strip())
        if match:
            pairs = (item.split("=", 1) for item in match.group(2).split(", ") if "=" in item)
            found[match.group(1)] = {key: float(value) for key, value in pairs}
    return found


def _number(value: float) -> str:
    """``1048576`` rather than ``1.04858e+06``: the quota is what was asked, to the byte."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _user(user: str) -> list[str]:
    return ["--entity-type", "users", "--entity-name", user]


def _run(settings: Settings, *args: str) -> str:
    broker = LocalBroker(settings.local_broker)
    jars = broker.ensure_jars()
    java_home = settings.local_broker.java_home
    java = _kraft.java_executable(str(java_home) if java_home else None)
    servers = kafka.bootstrap_servers(settings)
    with _command_config(settings) as config:
        cmd = [java, "-cp", f"{jars}/*", "kafka.admin.ConfigCommand",
               "--bootstrap-server", servers, "--command-config", str(config), *args]  # fmt: skip
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise DSPexError(
                f"kafka-configs {' '.join(args)} timed out after {TIMEOUT_S:.0f} s"
            ) from exc
    if proc.returncode != 0:
        output = "\n".join((proc.stdout + proc.stderr).splitlines()[-_kraft.TAIL_LINES :])
        raise DSPexError(f"kafka-configs {' '.join(args)} failed at {servers}:\n{output}")
    return proc.stdout


@contextlib.contextmanager
def _command_config(settings: Settings) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dspex-quotas-") as tmp:
        path = Path(tmp) / "client.properties"
        props = client_properties(settings)
        tls.write_private(path, "".join(f"{k}={v}\n" for k, v in props.items()).encode())
        yield path


def client_properties(settings: Settings) -> dict[str, str]:
    """Java client properties for the settings' security (the password revealed: a 0600 file)."""
    conf = settings.kafka
    if conf.ssl_certificate_location is not None:
        raise ConfigError("quotas: client certificates (mTLS) are not supported; use SASL")
    props: dict[str, str] = {"security.protocol": str(conf.security_protocol)}
    if conf.ssl_ca_location is not None:
        props |= {
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(conf.ssl_ca_location),
        }
    credentials = kafka.sasl_credentials(conf)
    if credentials is not None:
        login = _LOGINS.get(credentials.mechanism)
        if login is None:
            raise ConfigError(f"quotas: SASL mechanism {credentials.mechanism} is not supported")
        user, password = _quoted(credentials.username), _quoted(credentials.password)
        props |= {
            "sasl.mechanism": credentials.mechanism,
            "sasl.jaas.config": f'{login} required username="{user}" password="{password}";',
        }
    return props


def _quoted(value: str | None) -> str:
    return (value or "").replace("\\", "\\\\").replace('"', '\\"')
