"""The link probe: one protocol, over `runtime.transport`, for measuring the link to a peer.

Both ranks call `round_trips` at a quiet moment (no other traffic to either), one with
`initiator=True`, with the same sizes and repeats. The initiator sends message k, a header
`{"_ping": k}` and `size` bytes; the peer answers each with `{"_ping": k}` and either the
same bytes (`echo=True`) or nothing (`echo=False`). The initiator times each round trip;
a first unrecorded round over all sizes warms up the path.

- `ping_pong` (echo): one-way seconds = round trip / 2, for `runtime.transport.fit_link`.
- `adaptlink profile` (`runtime.profiling`, no echo): the answer is empty, so the slope of
  round trip over size is the a -> b bandwidth alone, and latency is half the intercept.

The transport is used duck-typed (`send`, `recv`), so this module does not import it and
`runtime.transport` can re-export `ping_pong`.
"""

from __future__ import annotations

import time

import torch

DEFAULT_PING_SIZES = (0, 64 * 1024, 256 * 1024, 1024 * 1024)


class ProbeError(RuntimeError):
    """The peer answered something that is not the probe's answer."""


def round_trips(transport, peer: int, *, initiator: bool, sizes, repeats: int, timeout: float,
                echo: bool = True) -> list[tuple[int, float]]:
    """Run the probe with `peer`. The initiator returns (size, round-trip seconds) for every
    recorded message; the peer returns []. Raises TimeoutError when the exchange has not
    ended within `timeout` s, ProbeError on a message that is not the probe's (and the
    transport's PeerFailure if `peer` fails)."""
    plan = [(s, i) for i in range(repeats + 1) for s in sizes]  # round 0: warm-up
    samples: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    def next_message():
        msg = transport.recv(timeout=left())
        if msg is None:
            raise TimeoutError(f"link probe with rank {peer}: no answer within {timeout:g} s")
        if msg.src != peer or "_ping" not in msg.header:
            raise ProbeError(f"link probe with rank {peer}: unexpected message from rank {msg.src}")
        return msg

    for k, (size, rnd) in enumerate(plan):
        if initiator:
            payload = {"x": torch.zeros(size, dtype=torch.uint8)}
            t0 = time.perf_counter()
            transport.send(peer, {"_ping": k}, payload, timeout=left())
            msg = next_message()
            dt = time.perf_counter() - t0
            if msg.header["_ping"] != k:
                raise ProbeError(f"link probe with rank {peer}: answer {msg.header['_ping']} to ping {k}")
            if rnd > 0:
                samples.append((size, dt))
        else:
            msg = next_message()
            transport.send(peer, msg.header, msg.tensors if echo else None, timeout=left())
    return samples


def ping_pong(transport, peer: int, *, initiator: bool, sizes: tuple[int, ...] = DEFAULT_PING_SIZES,
              repeats: int = 3, timeout: float = 60.0) -> list[tuple[int, float]]:
    """Measure the link to `peer` by `round_trips` with the payload echoed back: the
    initiator returns (size, one-way seconds = round trip / 2) samples, the peer returns []."""
    samples = round_trips(transport, peer, initiator=initiator, sizes=sizes, repeats=repeats,
                          timeout=timeout, echo=True)
    return [(size, dt / 2) for size, dt in samples]
