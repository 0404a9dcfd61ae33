"""CURVE keys for a client or worker connecting to a server that is secured with them.

Anything that leaves localhost should be encrypted and authorized: `npyloader keygen` makes
key pairs, the server admits only public keys it was given, and each peer connects with its
own key pair plus the server's public key. Key files are ZeroMQ's plain-text certificates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth


class CurveKeyError(ValueError):
    """A key file is missing or is not the kind this option needs; the message names it."""


def load_public(path: str | os.PathLike[str], option: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{option} {path}: cannot read a CURVE key: {e}") from e
    return public


def load_pair(path: str | os.PathLike[str], option: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{option} {path}: cannot read a CURVE key: {e}") from e
    if secret is None:
        raise CurveKeyError(f"{option} {path} holds only a public key; pass the .key_secret file "
                        "made by `npyloader keygen`")
    return public, secret


@dataclass(frozen=True)
class ClientCurve:
    """This peer's key pair and the server's public key, applied to a socket before connect."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes

    @classmethod
    def from_files(cls, secret_key_file: str | os.PathLike[str],
                   server_key_file: str | os.PathLike[str]) -> ClientCurve:
        public, secret = load_pair(secret_key_file, "--curve-secret-key")
        return cls(public, secret, load_public(server_key_file, "--curve-server-key"))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
        sock.curve_serverkey = self.server_key
