"""TLS for the OTLP endpoints: one server certificate for OTLP/HTTP (aiohttp) and OTLP/gRPC, optional client
authentication (mTLS), and reloading when the files change.

Follows the OpenTelemetry Collector's ``tls`` server settings (``configtls.ServerConfig``): ``cert_file``,
``key_file``, ``client_ca_file`` (set = clients must present a certificate that chains to it, "require and
verify"), ``min_version`` (1.2 by default) and ``reload_interval`` — here on by default, because cert-manager and
Kubernetes Secret volumes replace the files in place and a receiver should pick the new ones up without a restart.

Reloading: :meth:`ServerTls.watch` checks the files' modification times and sizes every ``reload_interval_s``; when
they changed it loads them into a new ``SSLContext`` (a pair that does not load — e.g. a key written before its
certificate — is skipped with a warning and retried at the next check, the old one stays in use). New connections
then get the new certificate: HTTP through the context's SNI callback, which is called for every handshake (also
without SNI) and switches the connection to the current context; gRPC through grpcio's dynamic credentials, whose
fetcher is asked at every handshake. Established connections keep the certificate they started with.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """The certificate, key or client CA cannot be used (missing, unreadable, not matching), with the file named."""


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


class ServerTls:
    """Server TLS settings and their current material.

    ``cert_file``: PEM certificate chain (leaf first); ``key_file``: its PEM private key (unencrypted);
    ``client_ca_file``: PEM CA certificates for client authentication, ``None`` = no client certificates asked for;
    ``min_version``: ``"1.2"`` or ``"1.3"``; ``reload_interval_s``: how often :meth:`watch` looks at the files
    (0 = never). Raises :class:`TlsConfigError` when the files cannot be loaded at start.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None, *,
                 min_version: str = "1.2", reload_interval_s: float = 10.0) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file is not None else None
        self.min_version = min_version
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()  # gRPC asks for the configuration from its own threads
        self._material = self._load()
        self._stamp = self._stamps()
        self._generation = 0
        self._grpc_generation = -1
        #: Successful reloads since start (for logs and tests).
        self.reloads = 0

    @property
    def mtls(self) -> bool:
        return self.client_ca_file is not None

    # -- loading ----------------------------------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _stamps(self) -> tuple:
        out = []
        for path in self._files():
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self) -> _Material:
        try:
            cert = self.cert_file.read_bytes()
            key = self.key_file.read_bytes()
            client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        except OSError as exc:
            raise TlsConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = _VERSIONS[self.min_version]
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"TLS certificate {self.cert_file} and key {self.key_file} do not load together: "
                                 f"{exc.reason or exc}") from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
            except ssl.SSLError as exc:
                raise TlsConfigError(f"TLS client CA file {self.client_ca_file} does not load: "
                                     f"{exc.reason or exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        return _Material(cert, key, client_ca, context)

    def reload_if_changed(self) -> bool:
        """Load the files again if their modification time, size or inode changed; True when new material is in
        use. A pair that does not load is left for the next check (logged), the old material stays."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        try:
            material = self._load()
        except TlsConfigError as exc:
            log.warning("tls.reload_failed", error=str(exc), keeping="the previous certificate")
            return False
        with self._lock:
            self._material = material
            self._stamp = stamp
            self._generation += 1
            self.reloads += 1
        log.info("tls.reloaded", cert_file=str(self.cert_file), reloads=self.reloads)
        return True

    async def watch(self) -> None:
        """Check the files every ``reload_interval_s`` until cancelled (nothing to do when it is 0)."""
        if self.reload_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.reload_interval_s)
            await asyncio.to_thread(self.reload_if_changed)

    # -- the two servers --------------------------------------------------------------------------------------------

    def http_context(self) -> ssl.SSLContext:
        """The ``SSLContext`` for aiohttp: the material at start, whose SNI callback moves every new connection to the
        current material's context."""
        front = self._load().context

        def current(ssl_object, server_name, initial_context) -> None:
            context = self._material.context
            if ssl_object.context is not context:
                ssl_object.context = context

        front.sni_callback = current
        return front

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpcio server credentials asking for the current material at every handshake (client certificates required
        when ``client_ca_file`` is set)."""

        def configuration(material: _Material):
            return grpc.ssl_server_certificate_configuration([(material.key, material.cert)],
                                                             root_certificates=material.client_ca)

        def fetch():
            with self._lock:
                if self._grpc_generation == self._generation:
                    return None  # unchanged: grpc keeps the configuration it has
                self._grpc_generation = self._generation
                material = self._material
            return configuration(material)

        with self._lock:
            self._grpc_generation = self._generation
            initial = configuration(self._material)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mtls)
