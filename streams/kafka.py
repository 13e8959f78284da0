"""Kafka client plumbing: where the cluster is, and well-configured clients for it.

The one place that turns settings into client configuration, for both client
libraries DSPex uses: confluent-kafka (librdkafka: :func:`client_conf`, with
:meth:`KafkaSettings.to_librdkafka`), on the whole request path and for every
compacted-topic reader, and faust (:func:`sasl_credentials` and :func:`ssl_context`,
which the learning and metrics agents' faust app wraps in its own credential
types). Delivery guarantees (idempotence, acks=all) and security settings are
decided here once, and so is the translation of librdkafka's security failures
(a wrong password, a plaintext client at a TLS listener, an untrusted broker
certificate, a denied ACL) into :class:`AccessRefused` naming the cause: every
client made here reports them through :class:`_Watch` (its error callback and
logger), which logs one clear line per cause and remembers the refusal for
:func:`refusal`, so a call that then times out can raise the cause instead.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from dspex.streams.errors import AccessRefused, BrokerUnavailable, ConfigError, InvalidRequest
from dspex.streams.ops.cluster import local_bootstrap
from dspex.streams.settings import MAX_MESSAGE_BYTES, KafkaSettings, Settings

_librdkafka_logger = logging.getLogger("librdkafka")
logger = logging.getLogger(__name__)


def bootstrap_servers(settings: Settings) -> str:
    """The configured cluster, else the running local broker; a clear error when neither."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    local = local_bootstrap(settings.local_broker)
    if local:
        return local
    raise ConfigError(
        "no Kafka cluster configured and no local broker running: "
        "run `dspex broker start` (or `dspex up`), or set KAFKA_BOOTSTRAP_SERVERS"
    )


def client_conf(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka configuration for this cluster, with ``overrides`` (dotted keys) on top."""
    conf: dict[str, Any] = settings.kafka.to_librdkafka(bootstrap_servers(settings))
    # librdkafka's own log lines go through Python logging, so one config governs them all;
    # the watch reads them (and the error callback) for a security refusal on the way.
    watch = _Watch(conf["bootstrap.servers"], conf["security.protocol"], _identity(conf))
    conf["logger"] = watch
    conf["error_cb"] = watch.error
    conf.update(overrides)
    return conf


def admin_client(settings: Settings) -> AdminClient:
    """An AdminClient for topic management."""
    return AdminClient(client_conf(settings))


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer (acks=all): retries never duplicate or reorder a partition."""
    defaults = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.kafka.linger_ms,
        # Java's and aiokafka's (faust's) key hashing: a key lands on the same partition
        # whoever produces it (librdkafka's default, CRC32, would split compacted topics)
        "partitioner": "murmur2_random",
        # what every DSPex topic takes (its max.message.bytes): a bigger record is refused
        # here, at once, and explain() says so instead of the broker after a round trip
        "message.max.bytes": MAX_MESSAGE_BYTES,
    }
    return Producer(client_conf(settings, **{**defaults, **overrides}))


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer that commits only what the caller explicitly stores or commits."""
    defaults = {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
    }
    return Consumer(client_conf(settings, **{**defaults, **overrides}))


def check_reachable(settings: Settings, timeout_s: float = 10.0) -> int:
    """Ask the cluster for metadata; return the number of brokers or raise BrokerUnavailable."""
    servers = bootstrap_servers(settings)
    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0.5)  # serve the error callbacks and log lines that name the cause
        refused = refusal(settings)
        if refused is not None:
            raise refused from exc
        raise BrokerUnavailable(f"bootstrap={servers}: no metadata in {timeout_s}s: {exc}") from exc
    return len(metadata.brokers)


# --- security refusals ----------------------------------------------------------------------

REFUSAL_TTL_S = 120.0  # a refusal older than this no longer explains a failure
_refusals: dict[str, tuple[float, AccessRefused]] = {}
_refusals_lock = threading.Lock()
_PLAINTEXT = ("PLAINTEXT", "SASL_PLAINTEXT")
_TLS = ("SSL", "SASL_SSL")
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)
_AUTHORIZATION = (
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
)


def classify(code: int | None, text: str, servers: str, protocol: str) -> AccessRefused | None:
    """The security refusal librdkafka reports with ``code`` (an error) or ``text`` (a log line).

    None when it is not one (a broker that is down, a timeout...).
    """
    where = f"Kafka at {servers} refused this client" if servers else "Kafka refused this client"
    if code in _AUTHORIZATION:
        return AccessRefused(
            "authorization",
            f"{where}: not authorised: {_shortened(text)} "
            "(no ACL grants this principal the operation)",
        )
    if code == KafkaError._AUTHENTICATION or "SASL authentication error" in text:
        return AccessRefused(
            "credentials",
            f"{where}: SASL authentication failed (wrong kafka.sasl_username, password or "
            f"kafka.sasl_mechanism): {_last_clause(text)}".split(" (after ")[0],
        )
    if "alert bad certificate" in text or "alert certificate required" in text:
        return AccessRefused(
            "client_certificate",
            f"{where}: the listener requires a client certificate signed by its CA (mTLS): "
            "set kafka.ssl_certificate_location and kafka.ssl_key_location",
        )
    if "certificate verify failed" in text:
        return AccessRefused(
            "certificate",
            f"{where}: the broker's TLS certificate is not trusted: kafka.ssl_ca_location must "
            "name the CA that signed it (the secured local broker's is security/ca.pem)",
        )
    if protocol in _PLAINTEXT and "in state APIVERSION_QUERY" in text and "Disconnected" in text:
        return AccessRefused(
            "plaintext",
            f"{where}: the listener closed a {protocol} connection at its first request: it "
            "expects TLS; set kafka.security_protocol to SASL_SSL (or SSL)",
        )
    if code == KafkaError._SSL or (protocol in _TLS and "SSL handshake failed" in text):
        return AccessRefused("tls", f"{where}: TLS handshake failed: {_last_clause(text)}")
    return None


def _shortened(text: str, limit: int = 200) -> str:
    """The broker's own words, without the request dump a forwarded request appends."""
    return text if len(text) <= limit else text[:limit] + "..."


def _last_clause(text: str) -> str:
    """librdkafka's message without its ``host:port/bootstrap:`` prefix."""
    return text.rsplit("/bootstrap: ", 1)[-1].strip()


def _identity(conf: dict[str, Any]) -> str:
    """Who a client is to the cluster: where, how, as whom (the password as a digest).

    Refusals are remembered per identity: another client of the same cluster with
    other credentials or another CA must not inherit this one's refusal.
    """
    keys = ("bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username",
            "ssl.ca.location", "ssl.certificate.location")  # fmt: skip
    password = str(conf.get("sasl.password", "")).encode()
    parts = [str(conf.get(key, "")) for key in keys]
    return "|".join([*parts, hashlib.sha256(password).hexdigest()[:16]])


def refusal(settings: Settings) -> AccessRefused | None:
    """The security refusal a client with these settings met lately in this process, if any."""
    identity = _identity(settings.kafka.to_librdkafka(bootstrap_servers(settings)))
    with _refusals_lock:
        seen = _refusals.get(identity)
    if seen is None or time.monotonic() - seen[0] > REFUSAL_TTL_S:
        return None
    return seen[1]


def explain(exc: Exception, settings: Settings | None = None) -> Exception:
    """``exc``, or what explains it as a DSPex error: an ACL denial or an over-size record
    it carries, else a refusal a client with ``settings`` met lately (a timeout after a
    wrong password...)."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(error, KafkaError) and error.code() in _TOO_LARGE:
        return InvalidRequest(
            "request",
            f"the record is larger than any DSPex topic takes (max.message.bytes="
            f"{MAX_MESSAGE_BYTES}); a request's inputs must fit router.max_request_bytes",
        )
    if isinstance(error, KafkaError) and error.code() in _AUTHORIZATION:
        return classify(error.code(), error.str(), "", "") or exc
    refused = refusal(settings) if settings is not None else None
    return refused if refused is not None else exc


class _Watch:
    """librdkafka's error callback and logger for one client: a security refusal, named once."""

    def __init__(self, servers: str, protocol: str, identity: str) -> None:
        self.servers = servers
        self.protocol = protocol
        self.identity = identity
        self.reported: set[str] = set()

    def error(self, error: KafkaError) -> None:
        """``error_cb``: librdkafka's client-wide errors (most are retried by itself)."""
        if not self._check(error.code(), error.str()):
            _librdkafka_logger.warning("client error: %s", error.str())

    def log(self, level: int, msg: str, *args: Any) -> None:
        """``logger``: every librdkafka log line (it calls ``log`` on this object).

        A line naming a refusal goes to DEBUG: its cause was logged once, clearly,
        and librdkafka repeats it on every reconnect.
        """
        named = self._check(None, msg % args if args else msg)
        _librdkafka_logger.log(logging.DEBUG if named else level, msg, *args)

    def _check(self, code: int | None, text: str) -> bool:
        refused = classify(code, text, self.servers, self.protocol)
        if refused is None:
            return False
        with _refusals_lock:
            _refusals[self.identity] = (time.monotonic(), refused)
        if refused.cause not in self.reported:
            self.reported.add(refused.cause)
            logger.error("%s", refused)
        return True


@dataclass(frozen=True)
class SaslCredentials:
    """SASL credentials the settings describe (the password revealed, for a client only)."""

    mechanism: str
    username: str | None
    password: str | None


def sasl_credentials(kafka: KafkaSettings) -> SaslCredentials | None:
    """The SASL credentials for a ``SASL_*`` security protocol; None otherwise."""
    if not kafka.security_protocol.startswith("SASL"):
        return None
    secret = kafka.password()
    password = secret.get_secret_value() if secret is not None else None
    return SaslCredentials(kafka.sasl_mechanism or "PLAIN", kafka.sasl_username, password)


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for an ``SSL``/``SASL_SSL`` security protocol; None otherwise.

    Verifies the broker's certificate against ``ssl_ca_location`` (the system's CAs
    when unset) and presents a client certificate when one is configured (mTLS).
    """
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    cafile = str(kafka.ssl_ca_location) if kafka.ssl_ca_location is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if kafka.ssl_certificate_location is not None:
        password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None
        key = str(kafka.ssl_key_location) if kafka.ssl_key_location is not None else None
        context.load_cert_chain(str(kafka.ssl_certificate_location), key, password)
    return context
