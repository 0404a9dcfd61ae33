"""CURVE on the server: key generation, and admitting only the public keys a user listed.

`npyloader keygen DIR` writes a key pair (NAME.key, public; NAME.key_secret, secret). The
server encrypts both of its endpoints with its own pair and runs a ZAP handler that admits
a client or worker only if its public key is among the certificates in `--authorized-keys`;
every refusal is logged with the key, so a stranger's attempt is visible.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from loader_client.security import CurveKeyError, load_pair

log = logging.getLogger(__name__)


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into `directory`; refuse to overwrite a pair."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise CurveKeyError(f"{public} already exists; choose another --name or remove the old pair")
    made_public, made_secret = zmq.auth.create_certificates(folder, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


class _AuthorizedKeys:
    """The ZAP callback: a key is admitted when it is listed, and every refusal is logged."""

    def __init__(self, directory: Path) -> None:
        self.keys = set(zmq.auth.load_certificates(directory))  # z85 text, as the callback gets it
        self.directory = directory

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        log.warning("refused a peer with CURVE key %s: not in --authorized-keys %s",
                    key.decode(errors="replace"), self.directory)
        return False


@dataclass(frozen=True)
class ServerCurve:
    public_key: bytes
    secret_key: bytes
    authorized: Path

    @classmethod
    def from_files(cls, secret_key_file: str | os.PathLike[str], authorized_dir: str | os.PathLike[str]) -> ServerCurve:
        public, secret = load_pair(secret_key_file, "--curve-secret-key")
        folder = Path(authorized_dir)
        if not folder.is_dir() or not any(folder.glob("*.key")):
            raise CurveKeyError(f"--authorized-keys {folder}: no public keys (*.key) there; copy each "
                            "client's and worker's NAME.key into it")
        return cls(public, secret, folder)

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        keys = _AuthorizedKeys(self.authorized)
        auth.configure_curve_callback(domain="*", credentials_provider=keys)
        log.info("CURVE on: %d authorized keys from %s", len(keys.keys), self.authorized)
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
