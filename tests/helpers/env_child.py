"""A rank that needs no torch (starts in milliseconds): `env_child.py S0 S1 ...`.

Writes its environment to $ADAPTLINK_TEST_OUT/env<rank>.json, then sleeps S<rank>
seconds ("inf": until killed) and exits 0.
"""

import json
import os
import sys
import time

rank = int(os.environ["RANK"])
path = os.path.join(os.environ["ADAPTLINK_TEST_OUT"], f"env{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump({**os.environ, "PID": os.getpid()}, f)
os.replace(path + ".tmp", path)
seconds = float(sys.argv[1 + rank])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    time.sleep(min(1.0, deadline - time.monotonic()))
sys.exit(0)
