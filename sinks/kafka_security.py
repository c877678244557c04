"""Kafka client security, in one place for every producer, consumer and admin client trace-source creates.

Three pieces:

* :class:`KafkaSecurityFields` — a pydantic mixin of ``kafka_*`` settings (security protocol, SASL mechanism and
  user, where the password comes from, CA file, client certificate and key, hostname verification). Every settings
  model that talks to Kafka (``serve``, ``worker assemble``, ``worker <stage>``, ``tail``, ``traces``, ``topics``)
  inherits it, so the flags, environment variables (``TRACE_SOURCE_KAFKA_SECURITY_PROTOCOL`` …) and config keys
  are the same everywhere. :meth:`KafkaSecurityFields.kafka_security` resolves it to a :class:`KafkaSecurity`.
* :class:`KafkaSecurity` — the resolved, validated settings (secrets read from their environment variable or file)
  and the one function :func:`aiokafka_kwargs` that turns them into aiokafka constructor arguments
  (``security_protocol``, ``ssl_context``, ``sasl_*``). Pass a ``KafkaSecurity`` to
  :class:`sinks.kafka.KafkaSink`, :func:`sinks.kafka_admin.create_topic`, ``pipeline.kafka_bus.KafkaConsumerBus``
  and ``KafkaPublisher``; a new worker gets security by passing it through.
* :func:`diagnose` / :func:`start_or_explain` — aiokafka reports a wrong password or an untrusted broker
  certificate only as "Unable to bootstrap" (the cause goes to its log). These open one connection themselves and
  name the cause; :class:`KafkaSecurityError` marks it permanent, so start-up fails at once instead of retrying.

Secrets never come from a command-line flag (``ps`` shows those): the SASL password and the client key's password
are read from the environment variable *named* by ``kafka_sasl_password_env`` / ``kafka_ssl_key_password_env``
(default ``TRACE_SOURCE_KAFKA_SASL_PASSWORD`` / ``TRACE_SOURCE_KAFKA_SSL_KEY_PASSWORD``) or from a file
(``kafka_sasl_password_file``, e.g. a mounted Kubernetes Secret). Names follow Kafka's client configs
(``security.protocol``, ``sasl.mechanism``, ``ssl.truststore`` …) and the OpenTelemetry Collector's ``auth`` /
``tls`` blocks of its Kafka components.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, TypeVar

from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]

DEFAULT_PASSWORD_ENV = "TRACE_SOURCE_KAFKA_SASL_PASSWORD"
DEFAULT_KEY_PASSWORD_ENV = "TRACE_SOURCE_KAFKA_SSL_KEY_PASSWORD"

T = TypeVar("T")


class KafkaSecurityError(KafkaError):
    """The cluster refused us for a reason retrying cannot fix: wrong credentials, an untrusted or mismatching broker
    certificate, a missing client certificate, a SASL mechanism the listener does not enable. The message names
    the broker and the setting to check."""

    retriable = False


class KafkaSecurity(BaseModel):
    """Resolved Kafka client security (secrets included, masked in ``repr``). ``PLAINTEXT`` with nothing else is
    the default. Raises ``pydantic.ValidationError`` for combinations that cannot work (SASL without user or
    password, a certificate without its key, TLS files with a non-TLS protocol)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_oauth_token_file: Path | None = None
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    #: Where the password was read from (``$NAME`` or a file path), for error messages; never the secret itself.
    sasl_password_source: str = "the SASL password"

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @model_validator(mode="after")
    def _consistent(self) -> "KafkaSecurity":
        if self.uses_sasl:
            if self.sasl_mechanism == "OAUTHBEARER":
                if self.sasl_oauth_token_file is None:
                    raise ValueError("SASL mechanism OAUTHBEARER needs kafka_sasl_oauth_token_file (a file holding "
                                     "the bearer token, re-read for every new connection)")
            elif not self.sasl_username:
                raise ValueError(f"SASL mechanism {self.sasl_mechanism} needs kafka_sasl_username")
            elif self.sasl_password is None:
                raise ValueError(f"SASL mechanism {self.sasl_mechanism} needs a password: none in "
                                 f"{self.sasl_password_source} (set it, or kafka_sasl_password_file / "
                                 f"kafka_sasl_password_env)")
        if not self.uses_tls and (self.ssl_ca_file or self.ssl_cert_file or self.ssl_key_file):
            raise ValueError(f"TLS files are set but kafka_security_protocol is {self.security_protocol}: use SSL or "
                             f"SASL_SSL")
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file go together (client certificate and its key)")
        for name in ("sasl_oauth_token_file", "ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"kafka_{name} {path}: no such file")
        return self

    def describe(self) -> str:
        """Short, secret-free text for logs: ``"SASL_SSL SCRAM-SHA-512 as alice"``."""
        parts = [self.security_protocol]
        if self.uses_sasl:
            parts.append(self.sasl_mechanism)
            if self.sasl_username:
                parts.append(f"as {self.sasl_username}")
        if self.ssl_cert_file is not None:
            parts.append("with client certificate")
        if self.uses_tls and not self.ssl_check_hostname:
            parts.append("(hostname not verified)")
        return " ".join(parts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client ``SSLContext``: the broker certificate must chain to ``ssl_ca_file`` (the system CAs when unset)
        and, unless ``ssl_check_hostname`` is off, name the host connected to. ``None`` without TLS. Raises
        ``ssl.SSLError`` / ``OSError`` for unreadable files."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ssl_ca_file) if self.ssl_ca_file else None)
        context.check_hostname = self.ssl_check_hostname  # verify_mode stays CERT_REQUIRED either way
        if self.ssl_cert_file is not None:
            password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
            context.load_cert_chain(str(self.ssl_cert_file), str(self.ssl_key_file), password=password)
        return context


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER token read from a file for every new connection (a sidecar or a projected service-account token
    keeps the file fresh). Raises ``OSError`` when it cannot be read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def token(self) -> str:
        return (await asyncio.to_thread(self.path.read_text)).strip()


def aiokafka_kwargs(security: KafkaSecurity | None) -> dict[str, Any]:
    """Constructor keyword arguments for ``AIOKafkaProducer``, ``AIOKafkaConsumer``, ``AIOKafkaAdminClient`` and
    ``aiokafka.conn.create_conn`` implementing ``security`` (``None`` = PLAINTEXT). A fresh ``SSLContext`` each call,
    so a client created after a certificate rotation loads the new files."""
    if security is None or security.security_protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": security.security_protocol}
    if security.uses_tls:
        kwargs["ssl_context"] = security.ssl_context()
    if security.uses_sasl:
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        if security.sasl_mechanism == "OAUTHBEARER":
            assert security.sasl_oauth_token_file is not None
            kwargs["sasl_oauth_token_provider"] = FileTokenProvider(security.sasl_oauth_token_file)
        else:
            kwargs["sasl_plain_username"] = security.sasl_username
            kwargs["sasl_plain_password"] = security.sasl_password.get_secret_value() if security.sasl_password \
                else None
    return kwargs


class KafkaSecurityFields(BaseModel):
    """The ``kafka_*`` security settings, mixed into every settings model that talks to Kafka (``--help`` shows
    each as a flag). :meth:`kafka_security` reads the secrets and validates the combination."""

    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="Kafka security.protocol: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL "
                                 "over TLS, what managed Kafka services use).")
    kafka_sasl_mechanism: SaslMechanism = Field(
        "SCRAM-SHA-512", description="SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or "
                                     "OAUTHBEARER (token from --kafka-sasl-oauth-token-file).")
    kafka_sasl_username: str | None = Field(None, description="SASL user name (PLAIN, SCRAM).")
    kafka_sasl_password_env: str = Field(
        DEFAULT_PASSWORD_ENV, description="Name of the environment variable holding the SASL password (never a "
                                          "flag: ps shows flags).")
    kafka_sasl_password_file: Path | None = Field(
        None, description="File holding the SASL password (e.g. a mounted Secret); wins over the variable.")
    kafka_sasl_oauth_token_file: Path | None = Field(
        None, description="OAUTHBEARER: file holding the bearer token, re-read for every new connection.")
    kafka_ssl_ca_file: Path | None = Field(
        None, description="PEM CA certificates the broker's certificate must chain to (default: the system's).")
    kafka_ssl_cert_file: Path | None = Field(
        None, description="PEM client certificate (chain) for brokers that require client authentication (mTLS).")
    kafka_ssl_key_file: Path | None = Field(None, description="PEM private key of --kafka-ssl-cert-file.")
    kafka_ssl_key_password_env: str = Field(
        DEFAULT_KEY_PASSWORD_ENV, description="Name of the environment variable holding the client key's "
                                              "password, if the key is encrypted.")
    kafka_ssl_check_hostname: bool = Field(
        True, description="Verify that the broker's certificate names the host connected to.")

    @model_validator(mode="after")
    def _resolvable(self) -> "KafkaSecurityFields":
        try:
            self.kafka_security()  # fail at start-up, naming the setting, rather than at the first connection
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return self

    def kafka_security(self) -> KafkaSecurity:
        """The resolved :class:`KafkaSecurity`. Raises ``ValueError`` naming the setting for a missing password,
        an unreadable file or an inconsistent combination."""
        password: str | None = None
        source = f"${self.kafka_sasl_password_env}"
        if self.kafka_sasl_password_file is not None:
            source = f"the password in {self.kafka_sasl_password_file}"
            try:
                password = self.kafka_sasl_password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"kafka_sasl_password_file {self.kafka_sasl_password_file}: {exc.strerror}") \
                    from None
        elif self.kafka_sasl_password_env:
            password = os.environ.get(self.kafka_sasl_password_env)
        key_password = os.environ.get(self.kafka_ssl_key_password_env) if self.kafka_ssl_key_password_env else None
        return KafkaSecurity(
            security_protocol=self.kafka_security_protocol, sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=SecretStr(password) if password is not None else None,
            sasl_oauth_token_file=self.kafka_sasl_oauth_token_file, ssl_ca_file=self.kafka_ssl_ca_file,
            ssl_cert_file=self.kafka_ssl_cert_file, ssl_key_file=self.kafka_ssl_key_file,
            ssl_key_password=SecretStr(key_password) if key_password else None,
            ssl_check_hostname=self.kafka_ssl_check_hostname, sasl_password_source=source)


#: Names of the mixin's fields (settings models that read a prefixed environment also read ``TRACE_SOURCE_<NAME>``).
SECURITY_FIELDS: tuple[str, ...] = tuple(KafkaSecurityFields.model_fields)


# -- naming the cause of a failed connection ------------------------------------------------------------------------


async def diagnose(bootstrap_servers: str, security: KafkaSecurity | None, *,
                   timeout_s: float = 10.0) -> KafkaSecurityError | None:
    """Connect to the bootstrap servers one by one as the clients would (TCP, TLS handshake, SASL authentication).
    Returns ``None`` as soon as one connection is fully set up, or when every failure looks transient (refused,
    timed out: the broker may come back); otherwise a :class:`KafkaSecurityError` naming the cause."""
    security = security or KafkaSecurity()
    problem: KafkaSecurityError | None = None
    deadline = time.monotonic() + timeout_s
    for host, port, _ in collect_hosts(bootstrap_servers, randomize=False):
        where = f"{host}:{port}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            conn = await create_conn(host, port, client_id="trace-source-diagnose",
                                     request_timeout_ms=int(min(remaining, 5.0) * 1000), **aiokafka_kwargs(security))
        except SaslAuthenticationFailed as exc:
            problem = KafkaSecurityError(
                f"SASL authentication as {security.sasl_username or '(token)'} with {security.sasl_mechanism} failed "
                f"at {where}: {exc.args[0] if exc.args else exc} (check --kafka-sasl-username and "
                f"{security.sasl_password_source})")
        except UnsupportedSaslMechanismError as exc:
            problem = KafkaSecurityError(f"the listener at {where} does not enable SASL {security.sasl_mechanism}: "
                                         f"{exc}")
        except ssl.SSLCertVerificationError as exc:
            problem = KafkaSecurityError(_verify_message(where, security, exc))
        except ssl.SSLError as exc:
            problem = KafkaSecurityError(f"TLS handshake with {where} failed: {exc.reason or exc} (is the listener "
                                         f"{security.security_protocol}?)")
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            if security.uses_tls:
                tls_problem = await _tls_alert(host, port, security)
                if tls_problem is not None:
                    problem = KafkaSecurityError(f"{where} refused the TLS session: {tls_problem}")
                    continue
            if _closed_during_setup(exc) and problem is None:
                problem = KafkaSecurityError(
                    f"{where} closed the connection while it was being set up with {security.describe()}: the "
                    f"listener probably expects another security protocol (--kafka-security-protocol)")
            continue
        else:
            conn.close()
            return None
    return problem


async def start_or_explain(start: Callable[[], Awaitable[T]], bootstrap_servers: str,
                           security: KafkaSecurity | None) -> T:
    """``await start()`` (a client's ``start()``); when it fails, raise :class:`KafkaSecurityError` if
    :func:`diagnose` finds a cause that retrying cannot fix, else the original error."""
    try:
        return await start()
    except (KafkaError, OSError) as exc:
        if isinstance(exc, KafkaSecurityError):
            raise
        problem = await diagnose(bootstrap_servers, security)
        if problem is not None:
            raise problem from exc
        raise


def _verify_message(where: str, security: KafkaSecurity, exc: ssl.SSLCertVerificationError) -> str:
    detail = exc.verify_message or str(exc)
    if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
        return (f"the TLS certificate of {where} does not name that host ({detail}); connect by a name the "
                f"certificate lists, or turn --no-kafka-ssl-check-hostname on only if you must")
    ca = f"--kafka-ssl-ca-file {security.ssl_ca_file}" if security.ssl_ca_file else "the system CA store"
    return f"the TLS certificate of {where} is not trusted by {ca}: {detail}"


def _closed_during_setup(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError) and "closed" in str(exc).lower()


async def _tls_alert(host: str, port: int, security: KafkaSecurity) -> str | None:
    """With TLS 1.3 the broker checks the client certificate after the client finished its handshake, and its
    refusal (an alert) arrives on the first read, which aiokafka reports only as "connection closed". Read it."""
    try:
        context = security.ssl_context()
    except (ssl.SSLError, OSError) as exc:
        return f"cannot load the client TLS files: {exc}"
    try:
        async with asyncio.timeout(3.0):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except (ssl.SSLEOFError, ConnectionResetError):
        # TCP was accepted, then dropped on our ClientHello: a Kafka listener without TLS reads it as a giant request
        return ("the listener dropped the connection during the TLS handshake: it probably does not speak TLS (a "
                "PLAINTEXT or SASL_PLAINTEXT listener? check --kafka-security-protocol and the port)")
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(1.0):
            await reader.read(1)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if security.ssl_cert_file is None:  # brokers answer bad_certificate or certificate_required to none at all
            return f"{reason}: the broker requires a client certificate (--kafka-ssl-cert-file, --kafka-ssl-key-file)"
        return (f"{reason}: the broker does not accept the client certificate {security.ssl_cert_file} (is it "
                f"signed by a CA the broker trusts?)")
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return None
