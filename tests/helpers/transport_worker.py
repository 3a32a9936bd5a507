"""One rank of a multi-rank transport/launcher test: `transport_worker.py SCENARIO`.

Started by runtime.launcher (or torchrun) from tests/test_transport.py and
tests/test_launcher.py. Rank 0 (the coordinator) writes what it saw to
$ADAPTLINK_TEST_OUT/result.json; the test asserts on it. Any failed check raises, so the
rank exits non-zero and the test sees it in the launcher's result.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from runtime import wire
from runtime.heartbeat import Heartbeat, Membership
from runtime.launcher import TOKENS_KEY, init_rank
from runtime.transport import LinkEmulation, PeerFailure, Transport, fit_link, ping_pong

N_TRAFFIC = 40


def make_tensors(src: int, i: int) -> dict[str, torch.Tensor]:
    """Deterministic tensors of many dtypes and shapes for message i from src."""
    g = torch.Generator().manual_seed(1000 * src + i)
    out = {
        "f32": torch.randn(1 + i % 5, 3 + src, generator=g),
        "bf16": torch.randn(2, 7, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-10**12, 10**12, (i % 4,), generator=g),
        "mask": torch.rand(3, 1, 2, generator=g) > 0.5,
        "scalar": torch.tensor(float(i) + 0.25, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "strided": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),  # non-contiguous
        "c64": torch.randn(2, generator=g, dtype=torch.complex64),
    }
    if i % 7 == 3:  # bulk: over wire.INLINE_MAX, sent as its own gloo message
        out["big"] = torch.randn(300_000 // 4 + i, generator=g)
    return out


def check_tensors(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), (what, list(got), list(want))
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g, w), (what, k)


def write_result(obj: dict) -> None:
    path = os.path.join(os.environ["ADAPTLINK_TEST_OUT"], f"result{dist.get_rank()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def expect_failure(t: Transport, timeout: float) -> tuple[PeerFailure, list]:
    """Receive until a PeerFailure; returns it and the messages before it."""
    msgs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = t.recv(timeout=deadline - time.monotonic())
        except PeerFailure as f:
            return f, msgs
        if m is not None:
            msgs.append(m)
    raise AssertionError(f"no PeerFailure within {timeout} s")


# ---------------------------------------------------------------------------- scenarios
def traffic(ctx) -> None:
    """Ranks 1..W-1 send N messages each to rank 0 at once (mixed blocking and queued);
    rank 0 checks content and per-sender order and acknowledges each one while receiving."""
    t = Transport(ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        seen = {s: 0 for s in range(1, ctx.world_size)}
        acks = []
        for _ in range(N_TRAFFIC * (ctx.world_size - 1)):
            m = t.recv(timeout=60)
            assert m is not None, "traffic: timed out"
            assert m.seq == seen[m.src] == m.header["i"], (m.src, m.seq, seen[m.src], m.header)
            assert m.header["from"] == m.src and m.header["tags"] == ["a", {"b": [1, 2.5, None]}]
            check_tensors(m.tensors, make_tensors(m.src, m.seq), f"msg {m.seq} from {m.src}")
            seen[m.src] += 1
            acks.append(t.send(m.src, {"ack": m.seq}, {"echo": m.tensors["f32"]}, block=False))
        for a in acks:
            a.result(timeout=60)
        t.send(0, {"self": True}, {"x": torch.arange(5)})
        m = t.recv(timeout=5)
        assert m.src == 0 and m.header == {"self": True} and torch.equal(m.tensors["x"], torch.arange(5))
        stats = t.stats()
        write_result({"seen": seen, "stats": stats})
    else:
        try:
            t.send(0, {"bad": object()})
            raise AssertionError("a header with an object() was sent")
        except wire.WireError:
            pass
        futs = []
        for i in range(N_TRAFFIC):
            h = {"i": i, "from": ctx.rank, "tags": ("a", {"b": [1, 2.5, None]})}
            futs.append(t.send(0, h, make_tensors(ctx.rank, i), block=(i % 3 == 0)))
        for i in range(N_TRAFFIC):
            m = t.recv(timeout=60)
            assert m is not None and m.src == 0 and m.header == {"ack": i} and m.seq == i, (m and m.header)
            assert torch.equal(m.tensors["echo"], make_tensors(ctx.rank, i)["f32"])
        assert all(f.done() and f.exception() is None for f in futs)
    t.close()


def fault(ctx) -> None:
    """4 ranks. Rank 1 streams to rank 0 and answers pings throughout. Rank 2 dies (SIGKILL)
    in the middle of a message to rank 0: rank 0's transport must raise PeerFailure(2) by
    itself. Rank 3 streams to rank 0 until the launcher SIGSTOPs it (inject stop:rank=3,
    after_tokens); rank 0's Membership must fence it, so that its recv raises PeerFailure(3).
    Traffic between 0 and 1 goes on throughout."""
    store = ctx.store
    Heartbeat(store, ctx.rank).start()
    t = Transport(ctx.rank, ctx.world_size)
    if ctx.rank == 0:
        membership = Membership(store, ctx.world_size, rank=0, watch=[1, 3]).start()
        membership.attach(t)
        failures, from1, from3, t_failure, from1_after = {}, 0, 0, {}, 0
        deadline = time.monotonic() + 60
        dead_send = None
        while len(failures) < 2 or from1_after < 20 or dead_send is None:
            assert time.monotonic() < deadline, (failures, from1, from3)
            try:
                m = t.recv(timeout=1.0)
            except PeerFailure as f:
                failures[f.rank] = f.reason
                t_failure[f.rank] = time.time()
                continue
            if m is None:
                continue
            if m.src == 1:
                dead_send = m.header.get("dead_send", dead_send)
                from1 += 1
                from1_after += len(failures) == 2
                t.send(1, {"pong": m.header["i"]}, block=False)
            elif m.src == 3:
                from3 += 1
                store.add(TOKENS_KEY, 1)  # the launcher stops rank 3 after a few of these
            elif m.src == 2:
                check_tensors(m.tensors, make_tensors(2, m.seq), "from 2")
        # after both failures: sends to the dead fail at once, rank 1 still answers
        t0 = time.monotonic()
        for r in (2, 3):
            try:
                t.send(r, {"late": True})
                raise AssertionError(f"send to fenced rank {r} succeeded")
            except PeerFailure as f:
                assert f.rank == r
        late_send_s = time.monotonic() - t0
        t.send(1, {"done": True})
        # wait for rank 1's goodbye, receiving meanwhile: rank 1 may be inside a send to us,
        # and exiting first would leave it blocked until the launcher ends it (SIGTERM)
        bye_deadline = time.monotonic() + 10
        while time.monotonic() < bye_deadline:
            try:
                m = t.recv(timeout=0.5)
            except PeerFailure:
                continue
            if m is not None and m.src == 1 and m.header.get("bye"):
                break
        write_result({"failures": failures, "t_failure": t_failure, "from1": from1, "from1_after": from1_after, "from3": from3,
                      "late_send_s": late_send_s, "dead_send": dead_send, "t_kill2": float(store.get("t_kill2")),
                      "deaths": {r: [d.reason, d.detected_at] for r, d in membership.dead.items()},
                      "stats": t.stats()})
        membership.stop()
    elif ctx.rank == 1:
        from runtime.heartbeat import read_dead

        i, pongs, dead_send = 0, 0, None
        while True:
            if dead_send is None and i % 10 == 0 and read_dead(store, 2) is not None:
                # rank 2 is dead but this transport was not told: the gloo send itself fails
                t0 = time.monotonic()
                try:
                    t.send(2, {"hello": "dead"}, timeout=10)
                    dead_send = {"error": "send to dead rank 2 succeeded"}
                except PeerFailure as f:
                    dead_send = {"s": time.monotonic() - t0, "reason": f.reason, "rank": f.rank}
            h = {"i": i} if dead_send is None else {"i": i, "dead_send": dead_send}
            t.send(0, h, {"x": torch.randn(64)})
            i += 1
            try:
                m = t.recv(timeout=0.02)
            except PeerFailure as f:  # the failed send to rank 2 is also reported here
                assert f.rank == 2, f
                continue
            while m is not None:
                if m.header.get("done"):
                    assert pongs > 0
                    t.send(0, {"bye": True})
                    return
                pongs += 1
                m = t.recv(timeout=0)
    elif ctx.rank == 2:
        for i in range(5):
            t.send(0, {"i": i}, make_tensors(2, i))
        # die half-way through a message: prefix announcing a 256 KiB body, then SIGKILL
        dist.send(torch.tensor([wire.MAGIC, 100, wire.INLINE_MAX, 0], dtype=torch.int64), 0, tag=wire.TAG_PREFIX)
        store.set("t_kill2", repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    elif ctx.rank == 3:
        i = 0
        while True:  # until SIGSTOPped, then SIGKILLed by the launcher once fenced
            t.send(0, {"i": i}, {"x": torch.randn(256)})
            i += 1
            time.sleep(0.01)


# Frames a rank of the run (or a stranger on its gloo pairs) might send; rank 0 must fence
# each sender at once and go on with rank 1. Index + 2 is the attacking rank.
ATTACKS = ("bad_tag", "tampered", "replay", "garbage", "types", "spec", "huge_body", "huge_bulk")
ATTACK_CAP = 8 << 20  # rank 0's max_message_bytes
N_GOOD = 40


def _raw_send(frame: wire.Frame, dst: int, *, body: bool = True, bulk: bool = True) -> None:
    dist.send(frame.prefix, dst, tag=wire.TAG_PREFIX)
    if body:
        dist.send(frame.body, dst, tag=wire.TAG_BODY)
    for b in frame.bulk if bulk else ():
        dist.send(b, dst, tag=wire.TAG_BODY)


def _raw_frame(env: bytes, inline_len: int = 0, n_bulk: int = 0) -> wire.Frame:
    """A frame whose envelope bytes are `env`, as is (tag zeros)."""
    body = torch.zeros(wire._align(len(env)) + inline_len + wire.MAC_LEN, dtype=torch.uint8)
    body[: len(env)] = torch.frombuffer(bytearray(env), dtype=torch.uint8)
    prefix = torch.tensor([wire.MAGIC, len(env), inline_len, n_bulk], dtype=torch.int64)
    return wire.Frame(prefix, body, [], body.numel())


def attack(name: str, secret, rank: int) -> None:
    """Send rank 0 the forged or malformed frame `name` (its first message on this link)."""
    good_h = {"kind": "act", "i": 0}
    if name == "bad_tag":  # a stranger's key (or none): a proper frame, the wrong tag
        from runtime.auth import RunSecret

        _raw_send(wire.encode(0, good_h, {"x": torch.randn(300_000)}, secret=RunSecret.generate(),
                              src=rank, dst=0), 0)
    elif name == "tampered":  # the run's key, one bulk byte flipped after signing
        fr = wire.encode(0, good_h, {"x": torch.zeros(300_000)}, secret=secret, src=rank, dst=0)
        fr.bulk[0] = fr.bulk[0].clone()
        fr.bulk[0][12345] ^= 1
        _raw_send(fr, 0)
    elif name == "replay":  # a genuine message, then the very same frame again
        fr = wire.encode(0, {"legit": True}, {"x": torch.arange(10)}, secret=secret, src=rank, dst=0)
        _raw_send(fr, 0)
        _raw_send(fr, 0)
    elif name == "garbage":  # a body that is not msgpack
        _raw_send(_raw_frame(b"\xc1" * 40), 0)
    elif name == "types":  # msgpack of the wrong shape
        _raw_send(_raw_frame(wire.pack_header({"v": wire.WIRE_VERSION, "seq": "zero", "h": [1], "t": 5})), 0)
    elif name == "spec":  # a tensor that does not fit the body it names
        env = wire.pack_header({"v": wire.WIRE_VERSION, "seq": 0, "h": {},
                                "t": [["x", "float32", [1000], 4000, 0]]})
        _raw_send(_raw_frame(env, inline_len=16), 0)
    elif name == "huge_body":  # a prefix announcing a 4 GiB body
        dist.send(torch.tensor([wire.MAGIC, 100, 4 << 30, 0], dtype=torch.int64), 0, tag=wire.TAG_PREFIX)
    elif name == "huge_bulk":  # a small body naming a 4 GiB bulk tensor
        env = wire.pack_header({"v": wire.WIRE_VERSION, "seq": 0, "h": {},
                                "t": [["x", "uint8", [4 << 30], 4 << 30, -1]]})
        _raw_send(_raw_frame(env, n_bulk=1), 0)
    else:
        raise ValueError(name)


def attacks(ctx) -> None:
    """Rank 1 streams N_GOOD signed messages to rank 0; once rank 0 has 5 of them, ranks
    2.. each send one of ATTACKS. Rank 0 records the PeerFailure of each attacker and
    checks rank 1's messages; after every attacker is fenced rank 1 sends one more."""
    from runtime.auth import RunSecret

    secret = RunSecret.from_env()
    assert secret is not None and ctx.world_size == 2 + len(ATTACKS)
    store = ctx.store
    if ctx.rank == 0:
        t = Transport(0, ctx.world_size, secret=secret, max_message_bytes=ATTACK_CAP)
        failures, t_failure, good, other = {}, {}, 0, []
        attackers = set(range(2, ctx.world_size))
        deadline = time.monotonic() + 60
        last = False
        while not last:
            assert time.monotonic() < deadline, (failures, good)
            try:
                m = t.recv(timeout=1.0)
            except PeerFailure as f:
                failures[f.rank] = f.reason
                t_failure[f.rank] = time.time()
                if set(failures) >= attackers:
                    store.set("attacks_done", "1")
                continue
            if m is None:
                continue
            if m.src == 1:
                assert m.header.get("i") == good == m.seq, (m.header, good)
                check_tensors(m.tensors, make_tensors(1, m.seq), f"msg {m.seq} from 1")
                good += 1
                last = m.header.get("last", False)
                if good == 5:
                    store.set("go", "1")
            else:
                other.append([m.src, m.seq, m.header])
        write_result({"failures": failures, "t_failure": t_failure, "good": good, "other": other,
                      "t_attack": {r: float(store.get(f"t_attack/{r}")) for r in attackers},
                      "stats": t.stats()})
        t.close()
    elif ctx.rank == 1:
        t = Transport(1, ctx.world_size, secret=secret)
        for i in range(N_GOOD):
            t.send(0, {"i": i}, make_tensors(1, i), block=False)
            time.sleep(0.01)
        store.wait(["attacks_done"])
        t.send(0, {"i": N_GOOD, "last": True}, make_tensors(1, N_GOOD))
        t.close()
    else:
        store.wait(["go"])
        store.set(f"t_attack/{ctx.rank}", repr(time.time()))
        threading.Thread(target=attack, args=(ATTACKS[ctx.rank - 2], secret, ctx.rank), daemon=True).start()
        store.wait(["attacks_done"])  # the attack's last send may never be taken: leave it


def link(ctx) -> None:
    """Measure an emulated 100 Mbit/s, 2 ms link between ranks 0 and 1."""
    emu = LinkEmulation(default=(100e6 / 8, 0.002))
    t = Transport(ctx.rank, ctx.world_size, links=emu)
    samples = ping_pong(t, 1 - ctx.rank, initiator=ctx.rank == 0,
                        sizes=(0, 512 * 1024, 1024 * 1024, 2048 * 1024), repeats=4)
    if ctx.rank == 0:
        fit = fit_link(samples)
        write_result({"samples": samples, "bandwidth": fit.bandwidth_bytes_per_s,
                      "latency": fit.latency_s, "stats": t.stats()})
    t.close()


def tokens(ctx) -> None:
    """Rank 0 counts tokens in the store; the launcher kills rank 1 at 10 (after_tokens).
    Rank 0 exits 0 once it sees dead/1, which the launcher must write on reaping."""
    from runtime.heartbeat import read_dead

    if ctx.rank == 0:
        t_dead = None
        for n in range(400):
            ctx.store.add(TOKENS_KEY, 1)
            time.sleep(0.02)
            if (rec := read_dead(ctx.store, 1)) is not None:
                t_dead = time.time()
                break
        assert rec is not None, "rank 1 was never marked dead"
        write_result({"tokens_at_death": n + 1, "record": rec, "t_seen": t_dead,
                      "threads": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"]})
    else:
        time.sleep(120)


def torchrun_smoke(ctx) -> None:
    """init_rank under plain torchrun: a message each way between ranks 0 and 1."""
    t = Transport(ctx.rank, ctx.world_size)
    peer = 1 - ctx.rank
    t.send(peer, {"hello": ctx.rank}, {"x": torch.full((3,), float(ctx.rank))})
    m = t.recv(timeout=30)
    assert m.src == peer and m.header == {"hello": peer}
    assert torch.equal(m.tensors["x"], torch.full((3,), float(peer)))
    if ctx.rank == 0:
        write_result({"ok": True, "world_size": ctx.world_size})
    t.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(message)s")
    scenario = {f.__name__: f for f in (traffic, fault, attacks, link, tokens, torchrun_smoke)}[sys.argv[1]]
    ctx = init_rank(timeout=60)
    scenario(ctx)
    sys.stdout.flush()
    # No destroy_process_group: a receiver thread is still blocked in gloo, and the
    # process exits anyway; os._exit skips interpreter teardown of those threads.
    os._exit(0)
