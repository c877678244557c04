"""Bearer-token authentication: each token maps to a source id that travels with the data.

Tokens come from settings (config file or ``TRACE_SOURCE_AUTH_TOKENS``); with none configured, authentication is off
and every request gets the default source id. Follows RFC 6750 (``Authorization: Bearer <token>``); the HTTP server
answers 401 with ``WWW-Authenticate: Bearer`` and the gRPC server UNAUTHENTICATED when :meth:`Authenticator.source_for`
returns ``None``.
"""

from __future__ import annotations

import hmac
from typing import Mapping


class Authenticator:
    """Maps an ``Authorization`` header value (str or None) to a source id (str), or ``None`` when refused.

    Every configured token is compared with :func:`hmac.compare_digest`, and all of them are always compared, so
    the time taken does not reveal which token (or how much of one) matched.
    """

    def __init__(self, tokens: Mapping[str, str], default_source_id: str) -> None:
        self._tokens = [(t.encode(), source) for t, source in tokens.items()]
        self._default = default_source_id

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def source_for(self, authorization: str | None) -> str | None:
        if not self._tokens:
            return self._default
        if not authorization:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            return None
        given = credentials.strip().encode()
        found: str | None = None
        for token, source in self._tokens:
            if hmac.compare_digest(token, given):
                found = source
        return found
