"""``densemap score --server``: which server, how to reach it (token, TLS), and what a failed
connection means in the flags of the command.

A plaintext client of a TLS server sees the connection closed ("Socket closed"); a TLS client
of a plaintext server sees ``WRONG_VERSION_NUMBER``; an untrusted certificate
``CERTIFICATE_VERIFY_FAILED``: each becomes one error that names the flag to change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from densemap.service.errors import InvalidOption

TOKEN_ENV = "DENSEMAP_AUTH_TOKEN"  # the server's own variable: one Secret serves both sides
TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header value carries


@dataclass(frozen=True)
class ServerTarget:
    """A running ``densemap serve``: ``address`` HOST:PORT (any gRPC target), the bearer
    ``token`` it requires (None: none), ``tls`` on, and ``ca_cert``: the PEM file of the CA
    that signed its certificate (None: the system's roots)."""

    address: str
    token: str | None = None
    tls: bool = False
    ca_cert: Path | None = None

    def open_client(self):
        """A :class:`~densemap.service.client.DensemapClient` for this server."""
        from densemap.service.client import DensemapClient

        roots = None
        if self.ca_cert is not None:
            try:
                roots = Path(self.ca_cert).read_bytes()
            except OSError as exc:
                raise InvalidOption(
                    f"cannot read --ca-cert {str(self.ca_cert)!r}: {exc.strerror or exc}; pass "
                    "the PEM file of the CA that signed the server's certificate"
                ) from None
        tls = self.tls or roots is not None
        return DensemapClient(self.address, token=self.token, tls=tls, root_certificates=roots)


def server_target(
    address: str, *, token: str | None, tls: bool, ca_cert: str | None
) -> ServerTarget:
    """The target of ``--server`` with ``--token`` (else ``$DENSEMAP_AUTH_TOKEN``), ``--tls``
    and ``--ca-cert`` (which implies ``--tls``)."""
    source = "--token"
    if token is None:
        token, source = os.environ.get(TOKEN_ENV, "").strip() or None, TOKEN_ENV
    elif not token.strip():
        raise InvalidOption("--token is empty: give the server's token, or leave --token out")
    if token is not None and not TOKEN_CHARACTERS.fullmatch(token):
        raise InvalidOption(
            f"{source} holds characters a gRPC header cannot carry (spaces, control or "
            "non-ASCII characters): give the token exactly as the server was given it"
        )
    return ServerTarget(
        address=address,
        token=token,
        tls=tls or ca_cert is not None,
        ca_cert=Path(ca_cert) if ca_cert is not None else None,
    )


def explain_unreachable(target: ServerTarget, details: str) -> str:
    """What to do about the UNAVAILABLE or UNAUTHENTICATED answer (``details``) of the first
    call to ``target``, in the flags of ``densemap score``."""
    where = f"--server {target.address}"
    lowered = details.lower()
    if "wrong_version_number" in lowered or "http/1" in lowered:
        return (
            f"TLS handshake with {where} failed ({details}): the server does not speak TLS? "
            "Leave out --tls and --ca-cert for a plaintext server"
        )
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return (
            f"{where} has a certificate this client does not trust ({details}): pass --ca-cert "
            "PEM, the certificate of the CA that signed it (for a self-signed server, its own "
            "certificate)"
        )
    if "does not match ssl server name" in lowered or "no match found for server name" in lowered:
        return (
            f"{where}: the server's certificate does not name this address ({details}): "
            "connect by a name or IP address in the certificate's subjectAltName"
        )
    if "handshake" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"TLS handshake with {where} failed ({details}): check --tls and --ca-cert"
    if not target.tls and ("socket closed" in lowered or "connection reset" in lowered):
        return (
            f"{where} closed the connection ({details}): TLS required? Pass --tls (and "
            "--ca-cert PEM for a private CA) for a server started with --tls-cert"
        )
    if lowered.startswith("the server"):  # its own UNAVAILABLE: loading, draining, unusable
        return f"{where} answers but cannot score now: {details}"
    if "token" in lowered:
        return (
            f"{where} refused the call: {details}; pass --token TOKEN or set {TOKEN_ENV} "
            "(the server's token)"
        )
    return (
        f"no densemap server answers at {where} ({details}): start one with 'densemap serve' "
        "(port 50051) or check the address"
    )
