"""What makes the local broker a secured one (``dspex broker start --secure``).

The node serves clients on a ``SASL_SSL`` listener (SCRAM-SHA-512 over TLS from a
local CA, :mod:`dspex.streams.ops.tls`) and, for mTLS, an ``SSL`` listener that
requires a client certificate signed by that CA (the principal is the certificate's
subject, ``User:CN=<name>``); it authorises with ``StandardAuthorizer`` and
``allow.everyone.if.no.acl.found=false``: a principal may do only what an ACL grants,
except the super users

- ``User:dspex-admin``: DSPex's own processes and its operator (CLI, ``dspex up``),
  and ``User:CN=dspex-admin``, the same over mTLS;
- ``User:dspex-broker``: the node talking to itself on the ``SASL_SSL`` listener;
- ``User:CN=dspex-broker``: the node on its controller listener, which is TLS with
  required client certificates (mTLS) on 127.0.0.1 — not PLAINTEXT, since an
  unauthenticated controller listener would have to be a super user too and
  anyone on the host could reach it with ``bootstrap.controllers``.

The SCRAM users are seeded when storage is formatted (``--add-scram``); tenants are
added later through the Admin API (:mod:`dspex.streams.ops.tenants`). The material
lives in ``<data_dir>/security/``::

    ca.pem                the CA certificate clients trust (ssl_ca_location)
    ca-key.pem            the CA key (0600): signs the broker's and client certificates
    broker.pem            the broker's key and certificate: its PEM key store (0600)
    admin-cert.pem        dspex-admin's client certificate for the mTLS listener
    admin-key.pem         its key (0600)
    users/<user>.password generated SCRAM passwords (0600)
    dspex.toml            settings for DSPex as dspex-admin (DSPEX_SETTINGS_FILE)
    dspex-mtls.toml       the same over mTLS (SSL with the client certificate)
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from dspex.streams.ops import tls

ADMIN = "dspex-admin"
BROKER = "dspex-broker"
MECHANISM = "SCRAM-SHA-512"
USERS = (ADMIN, BROKER)
SUPER_USERS = (f"User:{ADMIN}", f"User:CN={ADMIN}", f"User:{BROKER}", f"User:CN={BROKER}")
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule"


class Material:
    """The CA, the broker's key store and the SCRAM passwords in ``<data_dir>/security``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "security"
        self.ca = self.dir / "ca.pem"
        self.ca_key = self.dir / "ca-key.pem"
        self.keystore = self.dir / "broker.pem"
        self.settings_file = self.dir / "dspex.toml"
        self.mtls_settings_file = self.dir / "dspex-mtls.toml"
        self.admin_cert = self.dir / "admin-cert.pem"
        self.admin_key = self.dir / "admin-key.pem"

    def exists(self) -> bool:
        """Whether this data dir was set up for a secured broker."""
        return self.ca.is_file()

    def ensure(self) -> None:
        """Create what is missing; never replace what exists (clients already trust the CA)."""
        (self.dir / "users").mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not (self.ca.is_file() and self.ca_key.is_file()):
            ca = tls.issue_ca()
            tls.write_private(self.ca_key, ca.key_pem)
            self.ca.write_bytes(ca.cert_pem)
        if not self.keystore.is_file():
            leaf = self.issue(BROKER)
            tls.write_private(self.keystore, leaf.key_pem + leaf.cert_pem)
        if not self.admin_cert.is_file():
            client = self.issue(ADMIN)
            tls.write_private(self.admin_key, client.key_pem)
            self.admin_cert.write_bytes(client.cert_pem)
        for user in USERS:
            if not self.password_file(user).is_file():
                tls.write_private(self.password_file(user), secrets.token_urlsafe(24).encode())

    def issue(self, common_name: str) -> tls.Issued:
        """A certificate signed by this CA (principal ``User:CN=<common_name>`` under mTLS)."""
        ca = tls.Issued(self.ca.read_bytes(), self.ca_key.read_bytes())
        return tls.issue_cert(ca, common_name)

    def password_file(self, user: str) -> Path:
        return self.dir / "users" / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text(encoding="utf-8").strip()

    def scram_args(self) -> list[str]:
        """``StorageTool format`` arguments seeding the SCRAM users."""
        args: list[str] = []
        for user in USERS:
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={self.password(user)}]"]
        return args

    def server_properties(self, listener: str, controller: str, mtls: str) -> dict[str, str]:
        """Listener, TLS, SASL and authorizer keys for ``server.properties`` (host:port each)."""
        jaas = f'{SCRAM_LOGIN} required username="{BROKER}" password="{self.password(BROKER)}";'
        listeners = f"SASL_SSL://{listener},SSL://{mtls},CONTROLLER://{controller}"
        return {
            "listeners": listeners,
            "advertised.listeners": listeners,
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,SSL:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
            "listener.name.controller.ssl.client.auth": "required",
            "listener.name.ssl.ssl.client.auth": "required",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca),
            "authorizer.class.name": AUTHORIZER,
            "allow.everyone.if.no.acl.found": "false",
            "super.users": ";".join(SUPER_USERS),
        }

    def client_settings(self, sasl_bootstrap: str, mtls_bootstrap: str) -> dict[str, str]:
        """DSPex TOML settings files (by name) connecting as ``dspex-admin``: by SCRAM
        (the password by file) and by client certificate (mTLS)."""
        sasl = {
            "bootstrap_servers": sasl_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_username": ADMIN,
            "sasl_password_file": str(self.password_file(ADMIN)),
            "ssl_ca_location": str(self.ca),
        }
        mtls = {
            "bootstrap_servers": mtls_bootstrap,
            "security_protocol": "SSL",
            "ssl_ca_location": str(self.ca),
            "ssl_certificate_location": str(self.admin_cert),
            "ssl_key_location": str(self.admin_key),
        }
        broker: dict[str, str | bool] = {"data_dir": str(self.dir.parent), "secure": True}
        return {
            self.settings_file.name: _toml("DSPex as dspex-admin", sasl, broker),
            self.mtls_settings_file.name: _toml("DSPex over mTLS", mtls, broker),
        }


def _toml(what: str, kafka: dict[str, str], local_broker: dict[str, str | bool]) -> str:
    """A settings file with a ``[kafka]`` and a ``[local_broker]`` section (json quoting is
    valid TOML for these strings and booleans)."""
    lines = [f"# Written by `dspex broker start --secure` on every start: {what}.", "[kafka]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in kafka.items()]
    lines += ["", "[local_broker]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in local_broker.items()]
    return "\n".join(lines) + "\n"
