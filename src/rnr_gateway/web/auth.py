"""Bearer tokens with scopes read < command < admin. Tokens are compared in constant time
and never logged."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping

from ..settings import HttpSettings, Scope
from .errors import HttpError

log = logging.getLogger(__name__)
RANK: dict[Scope, int] = {"read": 1, "command": 2, "admin": 3}


class Authenticator:
    def __init__(self, settings: HttpSettings) -> None:
        self.tokens = [(scope, secret.value.encode()) for scope, secret in settings.tokens]
        self.anonymous = settings.anonymous_scope
        if self.anonymous:
            log.warning(
                "API_ANONYMOUS_SCOPE=%s: requests without a token get %r access; "
                "use only on a trusted network",
                self.anonymous,
                self.anonymous,
            )

    def scope_of_token(self, token: str) -> Scope | None:
        raw = token.encode()
        found: Scope | None = None
        for scope, secret in self.tokens:  # no early exit: timing does not tell which
            if hmac.compare_digest(raw, secret) and (found is None or RANK[scope] > RANK[found]):
                found = scope
        return found

    def scope_of(self, headers: Mapping[str, str]) -> Scope | None:
        """The scope a request carries; raises 401 for a bad or malformed token."""
        header = headers.get("authorization")
        if not header:
            return self.anonymous
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise HttpError(401, "unauthorized", "use 'Authorization: Bearer <token>'")
        scope = self.scope_of_token(token.strip())
        if scope is None:
            raise HttpError(401, "unauthorized", "the token is not valid")
        return scope

    def require(self, headers: Mapping[str, str], needed: Scope) -> Scope:
        scope = self.scope_of(headers)
        if scope is None:
            raise HttpError(401, "unauthorized", "a bearer token is required")
        if RANK[scope] < RANK[needed]:
            raise HttpError(
                403, "forbidden", f"this needs the {needed!r} scope; the token has {scope!r}"
            )
        return scope
