"""Server TLS credentials (`--tls-cert --tls-key [--tls-client-ca]`).

With a client CA the server requires a client certificate signed by it (mTLS): a client without
one, or with one from another CA, fails in the handshake, before any RPC runs.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read_pem(path: str | Path, option: str) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{option} {path} is not a PEM file (expected a '-----BEGIN ...' block)")
    return data


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS credentials for `grpc.aio.server().add_secure_port`.

    Args:
        cert: PEM certificate chain of the server (its SANs must name the address clients dial).
        key: PEM private key of `cert`.
        client_ca: PEM CA bundle; when given, clients must present a certificate it signed.
    """
    pair = (_read_pem(key, "--tls-key"), _read_pem(cert, "--tls-cert"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read_pem(client_ca, "--tls-client-ca"),
                                       require_client_auth=True)


def check_options(cert, key, client_ca) -> None:
    """Refuse half-given TLS options before anything is loaded."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together: pass both to serve TLS, or neither")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca (mTLS) needs TLS: pass --tls-cert and --tls-key too")
