"""Bearer-token authentication for the encoder server (`--token-file`).

Every promptcast RPC must carry `authorization: Bearer <token>`, where the token is one line of
the token file (the server's `CallScope` asks `refusal`); the HTTP gateway asks the same of its
`Authorization` header. Probes (kubelet, load balancers, `grpc_health_probe`) cannot send tokens, so
health, reflection and HTTP `/healthz` stay open; they reveal nothing but the status and the
service names. The file is re-read on SIGHUP, so tokens rotate without a restart.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def read_tokens(path: str | Path) -> list[bytes]:
    """Tokens of a token file: one a line; blank lines and `#` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#")]


class TokenAuth:
    """The tokens of a token file, and whether a call's bearer token is one of them (`refusal`).

    Args:
        token_file: path of the token file. It must hold at least one token at start-up.
    """

    def __init__(self, token_file: str | Path):
        self.token_file = Path(token_file)
        self._tokens = read_tokens(self.token_file)
        if not self._tokens:
            raise ValueError(f"--token-file {self.token_file} holds no token (one token a line; "
                             "blank lines and # comments are ignored)")

    def reload(self) -> int:
        """Re-read the token file (SIGHUP). A file that cannot be read keeps the old tokens; an
        empty file revokes them all, which is what an operator emptying it means."""
        try:
            tokens = read_tokens(self.token_file)
        except (OSError, UnicodeDecodeError) as e:
            logger.error("token reload failed, keeping the %d current tokens: %s", len(self._tokens), e)
            return len(self._tokens)
        if not tokens:
            logger.warning("token file %s is empty: every authenticated call is now refused", self.token_file)
        self._tokens = tokens
        logger.info("reloaded %d tokens from %s", len(tokens), self.token_file)
        return len(tokens)

    def accepts(self, presented: bytes) -> bool:
        # compare_digest against every token, without stopping at a match, so the time taken
        # says nothing about which token (or how much of one) matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched

    def refusal(self, authorization: str | bytes | None) -> str | None:
        """None when an `authorization` value (gRPC metadata or HTTP header) carries an accepted bearer token,
        else the reason the call is refused."""
        if authorization is None:
            return ("this server requires a token: send `authorization: Bearer <token>` (gRPC metadata or HTTP "
                    "header; --token or $PROMPTCAST_TOKEN on promptcast commands)")
        value = authorization if isinstance(authorization, str) else authorization.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization value must be `Bearer <token>`"
        if not self.accepts(token.strip().encode()):
            return "the token was not accepted by this server (check --token / $PROMPTCAST_TOKEN)"
        return None
