"""The run's c10d store, authenticated with the run secret: strangers can neither name,
read the meaning of, nor forge a key.

The coordinator's TCPStore has no access control: any process that reaches its port can
list, read, write and delete every key (issue 14 section 6 measured it: one write of
`dead/0` killed a run; forged heartbeats hid a hung rank for 31 s; a rewritten gloo
rendezvous record let a stranger take rank 2's place in 11 of 11 runs). `SecureStore`
wraps a store client so that, for everything the ranks exchange through it:

- every key is stored under an opaque name: `<secret.namespace()>/<HMAC(key)[:32 hex]>`.
  TCPStore lets any client `list_keys()`, so a common prefix alone would hand the names
  out; with an HMAC per key a stranger sees 32 hex digits and cannot tell `dead/0` from
  `hb/2`, nor compute the name of a key that is not written yet;
- every value set is sealed: a 32-byte HMAC-SHA256 tag over the namespace, the key and
  the value, prepended to the value. `get` verifies it; a value that fails (forged,
  copied from another key, written by another run) raises `ForgedValueError` and is
  logged, never returned. Callers that poll treat it as absent (`read_dead`, the
  heartbeat monitor);
- `add` counters cannot carry a tag (the server adds to the integer it holds). Two keys
  are counters: `dead_count` (only tells monitors to re-read the sealed `dead/<rank>`
  records, so a forged bump costs a re-read and nothing else) and `tokens` (read only by
  failure injection in tests and experiments). Under opaque names a stranger cannot find
  them without the secret.

What it cannot do: stop a process that reaches the port from deleting or overwriting
keys it lists (a denial of service: the run then fails or stalls, it is not taken over).
Hence the store listens on the plan's coordinator address only (loopback on one machine;
`runtime.launcher.bind_listen_socket`).

The class is a Python subclass of `torch.distributed.Store`; torch (2.13) calls its
methods through its trampoline, so it can be given to `init_process_group(store=...)`
(wrapped in a PrefixStore): gloo's rendezvous records (each rank's address) are sealed
too, and a stranger's record is refused. Checked: gloo's rendezvous calls set/get/wait.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

from runtime.auth import MAC_LEN, RunSecret

log = logging.getLogger(__name__)

COUNTER_KEYS = ("dead_count", "tokens")  # incremented with add(): not sealed (see above)


class ForgedValueError(RuntimeError):
    """A store value whose tag does not verify: written by someone without the secret."""


def _bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class SecureStore(dist.Store):
    """`inner`: a store client (TCPStore, or any dist.Store); `secret`: the run's RunSecret."""

    def __init__(self, inner, secret: RunSecret):
        super().__init__()
        self.inner, self.secret = inner, secret
        self._ns = secret.namespace()
        self._names: dict[str, str] = {}
        self.forged = 0  # values refused by this client (for tests and the attack report)

    def __repr__(self) -> str:
        return f"SecureStore(run_id={self.secret.run_id})"

    # ------------------------------------------------------------------ names and seals
    def name(self, key: str) -> str:
        """The stored name of `key` (opaque without the secret)."""
        n = self._names.get(key)
        if n is None:
            n = self._ns + "/" + self.secret.mac("store-key", self._ns.encode(), key.encode()).hex()[:32]
            self._names[key] = n
        return n

    def seal(self, key: str, value) -> bytes:
        v = _bytes(value)
        return self.secret.mac("store-value", self._ns.encode(), key.encode(), v) + v

    def unseal(self, key: str, raw) -> bytes:
        raw = bytes(raw)
        tag, v = raw[:MAC_LEN], raw[MAC_LEN:]
        if len(raw) < MAC_LEN or not self.secret.verify(tag, "store-value", self._ns.encode(), key.encode(), v):
            self.forged += 1
            log.warning("store key %r: a value without a valid tag was refused (forged or from another run)", key)
            raise ForgedValueError(f"store key {key!r}: value not signed with this run's secret")
        return v

    # ------------------------------------------------------------------ dist.Store API
    def set(self, key: str, value) -> None:
        self.inner.set(self.name(key), self.seal(key, value))

    def get(self, key: str) -> bytes:
        return self.unseal(key, self.inner.get(self.name(key)))

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        """Values of `keys`; a forged one raises ForgedValueError (see `multi_get_or_none`)."""
        raws = self.inner.multi_get([self.name(k) for k in keys])
        return [self.unseal(k, r) for k, r in zip(keys, raws)]

    def multi_get_or_none(self, keys: Sequence[str]) -> list[bytes | None]:
        """Like multi_get, but a forged value comes back as None (for pollers)."""
        out = []
        for k, r in zip(keys, self.inner.multi_get([self.name(k) for k in keys])):
            try:
                out.append(self.unseal(k, r))
            except ForgedValueError:
                out.append(None)
        return out

    def multi_set(self, keys: Sequence[str], values: Sequence) -> None:
        self.inner.multi_set([self.name(k) for k in keys], [self.seal(k, v) for k, v in zip(keys, values)])

    def compare_set(self, key: str, expected, desired) -> bytes:
        """As TCPStore: set `desired` if the value is `expected` ("" = absent); returns the
        value now held (unsealed). A forged value held there raises ForgedValueError."""
        exp = b"" if _bytes(expected) == b"" else self.seal(key, expected)
        sealed = self.seal(key, desired)
        now = self.inner.compare_set(self.name(key), exp, sealed)
        return _bytes(desired) if bytes(now) == sealed else self.unseal(key, now)

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(self.name(key), amount)

    def check(self, keys: Sequence[str]) -> bool:
        return self.inner.check([self.name(k) for k in keys])

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        names = [self.name(k) for k in keys]
        if timeout is None:
            self.inner.wait(names)
        else:
            self.inner.wait(names, timeout)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(self.name(key))

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    @property
    def timeout(self) -> timedelta:
        return self.inner.timeout

    def clone(self) -> "SecureStore":
        """A SecureStore on a new connection (Heartbeat/Membership threads use their own)."""
        return SecureStore(self.inner.clone(), self.secret)
