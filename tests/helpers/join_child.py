"""One rank of a join/hang test of tests/test_security.py: `join_child.py MODE`.

join: init_rank, then rank 0 sends a message to every other member of the group and each
      answers it (through runtime.transport, numbered by the members), then each writes
      $ADAPTLINK_TEST_OUT/joined<rank>.json (its members, the answers) and exits 0.
hang: init_rank, run a Heartbeat (workers watch the coordinator, rank 0), then sleep
      until ended: the test SIGSTOPs the coordinator and expects the workers to notice.
A rank that init_rank refuses (no or wrong secret, a peer lost before joining) prints the
one-line error and exits 2, as adaptlink.launch does.
"""

import json
import os
import sys
import time
from pathlib import Path

from partitioner.errors import AdaptLinkError
from runtime.heartbeat import Heartbeat
from runtime.launcher import init_rank
from runtime.transport import PeerFailure, Transport

mode = sys.argv[1]
t0 = time.time()
try:
    ctx = init_rank(timeout=60)
except AdaptLinkError as e:
    print(f"join_child: error: {e}", file=sys.stderr, flush=True)
    os._exit(2)


def receive(t):
    """The next message; a rank left out of the group is reported once (PeerFailure): skipped."""
    while True:
        try:
            msg = t.recv(timeout=30)
        except PeerFailure:
            continue
        if msg is None:
            raise TimeoutError("no message within 30 s")
        return msg


answers = {}
if mode == "join":
    t = Transport(ctx.rank, ctx.world_size, secret=ctx.secret, members=ctx.members)
    others = [r for r in ctx.members if r != ctx.rank]
    if ctx.rank == 0:
        for r in others:
            t.send(r, {"ping": r}, block=True, timeout=30)
        while len(answers) < len(others):
            msg = receive(t)
            answers[msg.src] = msg.header["pong"]
    else:
        msg = receive(t)
        t.send(msg.src, {"pong": msg.header["ping"]}, block=True, timeout=30)
    t.close(timeout=2)
Path(os.environ["ADAPTLINK_TEST_OUT"], f"joined{ctx.rank}.json").write_text(
    json.dumps({"rank": ctx.rank, "join_s": time.time() - t0, "members": list(ctx.members),
                "answers": {str(k): v for k, v in answers.items()}}))
if mode == "hang":
    Heartbeat(ctx.store, ctx.rank, watch=0).start()
    while True:
        time.sleep(1)
os._exit(0)
