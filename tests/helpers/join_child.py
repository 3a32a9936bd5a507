"""One rank of a join/hang test of tests/test_security.py: `join_child.py MODE`.

join: init_rank, then write $ADAPTLINK_TEST_OUT/joined<rank>.json and exit 0.
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

mode = sys.argv[1]
t0 = time.time()
try:
    ctx = init_rank(timeout=60)
except AdaptLinkError as e:
    print(f"join_child: error: {e}", file=sys.stderr, flush=True)
    os._exit(2)
Path(os.environ["ADAPTLINK_TEST_OUT"], f"joined{ctx.rank}.json").write_text(
    json.dumps({"rank": ctx.rank, "join_s": time.time() - t0}))
if mode == "hang":
    Heartbeat(ctx.store, ctx.rank, watch=0).start()
    while True:
        time.sleep(1)
os._exit(0)
