"""The DSPex exception tree.

Every error DSPex raises derives from :class:`DSPexError`. The two branches say
what the caller should do with it::

    DSPexError
    ├── ConfigError                  settings cannot be used (bad value, missing file)
    ├── RequestFailed                a request's final response was not "ok" (client)
    ├── ClientClosed                 the client was closed while a request waited (client)
    ├── RetryableError               try again later, back off, break the circuit
    │   ├── BrokerUnavailable        no broker answered in time
    │   ├── RegistryUnavailable      schema registry 5xx / unreachable
    │   ├── RequestTimeout           no final response by the deadline (client)
    │   └── QuotaExceeded            a tenant is over a DSPex limit (router: status quota_exceeded)
    └── PermanentError               dead-letter the record, commit, move on
        ├── SerdeError               a record cannot be encoded or decoded
        │   ├── SchemaNotFound       unknown fingerprint / schema id / schema name
        │   └── CorruptRecord        garbage, truncated or mis-framed bytes
        ├── SchemaError              an .avsc is invalid, or a change breaks compatibility
        ├── InvalidRequest           a request that must not run (field + reason)
        │   └── InvalidPipeline      a pipeline with problems, each at its path
        │                            (dspex.streams.pipelines.problems)
        ├── ProgramError             a program could not be built or its LM output not parsed
        ├── TopicConfigError         a topic exists with a config that differs from the catalog
        ├── AccessRefused            the cluster refused this client: credentials, TLS, or an ACL
        │                            (``cause`` says which; mapped in dspex.streams.kafka)
        └── LocalBrokerError         the local KRaft broker cannot be resolved, formatted or started

Foreign exceptions (fastavro, struct, confluent-kafka, subprocess) are mapped
once, where they are caught, with ``raise X(...) from exc``. Messages name the
thing: topic, partition, offset, schema, field, path.
"""

from __future__ import annotations


class DSPexError(Exception):
    """Root of every error DSPex raises."""


class ConfigError(DSPexError):
    """Settings that cannot be used: a bad value, an unreadable settings file."""


class RetryableError(DSPexError):
    """A transient failure: the same call may succeed later."""


class BrokerUnavailable(RetryableError):
    """No Kafka broker answered within the timeout."""


class RegistryUnavailable(RetryableError):
    """The schema registry could not be reached or answered with a server error."""


class QuotaExceeded(RetryableError):
    """A tenant is over one of its DSPex limits (``settings.tenants``); try again later.

    ``limit`` names it (``requests_per_s``, ``tokens_per_day``).
    The router answers such a request with final status ``quota_exceeded``.
    """

    def __init__(self, tenant: str, limit: str, reason: str) -> None:
        self.tenant = tenant
        self.limit = limit
        super().__init__(f"tenant {tenant} is over its {limit} limit: {reason}")


class PermanentError(DSPexError):
    """A failure that retrying cannot fix: dead-letter it and move on."""


class SerdeError(PermanentError):
    """A record could not be encoded or decoded.

    ``topic`` names where the bytes came from or were going (``None`` when unknown).
    """

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        self.topic = topic
        where = f"topic={topic}: " if topic else ""
        super().__init__(f"{where}{message}")


class SchemaNotFound(SerdeError):
    """The bytes name a schema (fingerprint or registry id) this process does not know."""


class CorruptRecord(SerdeError):
    """The bytes are not a well-framed Avro record of the expected schema."""


class SchemaError(PermanentError):
    """An Avro schema is invalid or a change to it breaks backward compatibility."""


class InvalidRequest(PermanentError):
    """A request that must not reach a worker: bad signature, unknown module, bad input...

    ``field`` names the offending request field (``signature``, ``inputs.question``, ...).
    """

    def __init__(self, field: str, reason: str, *, request_id: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.request_id = request_id
        where = f"request_id={request_id} " if request_id else ""
        super().__init__(f"{where}field={field}: {reason}")


class ProgramError(PermanentError):
    """A program could not be built from its spec, or its LM output could not be parsed."""


class TopicConfigError(PermanentError):
    """A topic exists with partitions or configs that differ from the catalog."""


class AccessRefused(PermanentError):
    """The cluster refused this client, and retrying with the same settings cannot help.

    ``cause`` is one of :data:`REFUSALS`: ``credentials`` (wrong SASL user, password or
    mechanism), ``plaintext`` (a plaintext client at a TLS listener), ``certificate``
    (the broker's certificate is not trusted), ``client_certificate`` (an mTLS listener
    wants a client certificate its CA signed), ``tls`` (another TLS failure), or
    ``authorization`` (an ACL denies this principal the operation).
    """

    def __init__(self, cause: str, message: str) -> None:
        self.cause = cause
        super().__init__(message)


REFUSALS = ("credentials", "plaintext", "certificate", "client_certificate", "tls", "authorization")


class LocalBrokerError(PermanentError):
    """The local KRaft broker could not be resolved, formatted, started or stopped."""
