"""The run secret: what lets a rank prove it belongs to this run.

Every run has one secret of 32 random bytes. `adaptlink run` / `serve` (the one-machine
launcher) generates it and hands it to the ranks it spawns in the environment
(`ADAPTLINK_SECRET`, hex); a run over several machines takes it from `--secret-file F`
(a file holding the hex secret, readable by its owner only) or from `ADAPTLINK_SECRET`,
the same on every machine. Everything that matters is authenticated with it, using HMAC-
SHA256 from the standard library:

- store values (heartbeats, death records, the plan hash, the gloo rendezvous) are
  signed, and their keys live under a namespace derived from the secret, so a process
  holding only a store client can neither find nor forge them (`runtime.secure_store`);
- every transport message carries a tag over the run id, its (src, dst, seq) and all of
  its header and tensor bytes, so a forged, altered or replayed frame is refused.

What the secret does not protect: a device that holds it (a compromised rank can send
anything a rank of its role may send), and confidentiality (activations cross the link
in the clear; run over a network you trust, or a tunnel).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from partitioner.errors import AdaptLinkError

SECRET_ENV = "ADAPTLINK_SECRET"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
MAC_LEN = 32  # bytes of an HMAC-SHA256 tag


class SecretError(ValueError):
    """A secret that cannot be used; the message names where it came from."""


@dataclass(frozen=True, slots=True)
class RunSecret:
    key: bytes
    # derived once (a message's tag would otherwise pay for both, ~3 us of its ~15 us):
    # the run id, and per purpose an HMAC keyed with it that `hasher` copies
    _run_id: str = field(init=False, repr=False, compare=False, default="")
    _keyed: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.key, bytes) or len(self.key) < MIN_SECRET_BYTES:
            raise SecretError(f"a run secret needs at least {MIN_SECRET_BYTES} bytes")
        object.__setattr__(self, "_run_id", hmac.new(self.key, b"adaptlink/run-id", hashlib.sha256).hexdigest()[:16])

    def __repr__(self) -> str:  # never print the key
        return f"RunSecret(run_id={self.run_id})"

    # ------------------------------------------------------------------ making one
    @classmethod
    def generate(cls) -> "RunSecret":
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_hex(cls, text: str, where: str) -> "RunSecret":
        text = text.strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise SecretError(f"{where}: not a hex string (make one with "
                              f"`python -c 'import secrets; print(secrets.token_hex(32))'`)") from None
        if len(key) < MIN_SECRET_BYTES:
            raise SecretError(f"{where}: {len(key)} bytes; a run secret needs at least {MIN_SECRET_BYTES} "
                              f"({2 * MIN_SECRET_BYTES} hex digits)")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RunSecret":
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SecretError(f"{p}: cannot read the secret file: {e}") from None
        mode = p.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise SecretError(f"{p}: the secret file is readable by others (mode {stat.filemode(mode)}); "
                              f"chmod 600 {p}")
        return cls.from_hex(text, str(p))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RunSecret | None":
        value = (os.environ if environ is None else environ).get(SECRET_ENV)
        return None if not value else cls.from_hex(value, f"${SECRET_ENV}")

    @classmethod
    def resolve(cls, secret_file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> "RunSecret | None":
        """The secret a process was given: `--secret-file` first, then the environment."""
        if secret_file:
            return cls.from_file(secret_file)
        return cls.from_env(environ)

    def to_hex(self) -> str:
        return self.key.hex()

    def env(self) -> dict[str, str]:
        """The variable that hands this secret to a child process."""
        return {SECRET_ENV: self.to_hex()}

    # ------------------------------------------------------------------ using one
    @property
    def run_id(self) -> str:
        """A public name of the run (16 hex digits): safe to log, names nothing secret."""
        return self._run_id

    def mac(self, purpose: str, *parts: bytes | bytearray | memoryview) -> bytes:
        """HMAC-SHA256 over `purpose` and `parts`, each length-prefixed (no two different
        part lists give the same input)."""
        h = hmac.new(self.key, purpose.encode() + b"\0", hashlib.sha256)
        for p in parts:
            h.update(len(p).to_bytes(8, "little"))
            h.update(p)
        return h.digest()

    def hasher(self, purpose: str) -> "hmac.HMAC":
        """An open HMAC for data fed piece by piece (large tensors without a copy): a copy of
        the one keyed for `purpose`, the same as `hmac.new(key, purpose + NUL, sha256)`."""
        base = self._keyed.get(purpose)
        if base is None:
            base = self._keyed.setdefault(purpose, hmac.new(self.key, purpose.encode() + b"\0", hashlib.sha256))
        return base.copy()

    def verify(self, tag: bytes, purpose: str, *parts: bytes | bytearray | memoryview) -> bool:
        return isinstance(tag, (bytes, bytearray)) and hmac.compare_digest(bytes(tag), self.mac(purpose, *parts))

    def namespace(self) -> str:
        """The store prefix of this run's keys, derived from the secret (not guessable)."""
        return "al-" + hmac.new(self.key, b"adaptlink/store-namespace", hashlib.sha256).hexdigest()[:32]


def run_secret(environ: Mapping[str, str] | None = None) -> RunSecret:
    """The secret every rank of a run must hold (engine.serve calls this before joining).

    Taken from ${SECRET_ENV}: the one-machine launcher sets it for each rank it spawns; on
    several machines it comes from `--secret-file` (resolved by the entry point into the
    same variable). No secret, or a bad one: an AdaptLinkError naming both (exit 2), since
    a rank that cannot authenticate would only be refused by its peers."""

    try:
        secret = RunSecret.from_env(environ)
    except SecretError as e:
        raise AdaptLinkError(str(e)) from None
    if secret is None:
        raise AdaptLinkError(f"no run secret: set ${SECRET_ENV} (hex, {SECRET_BYTES} bytes; `adaptlink run` "
                             f"sets it for the ranks it starts) or pass --secret-file FILE, the same on every device")
    return secret
