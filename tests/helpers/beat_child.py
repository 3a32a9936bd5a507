"""A rank that only beats: connects to the store at MASTER_ADDR:MASTER_PORT, runs a
Heartbeat for $RANK, touches $ADAPTLINK_TEST_OUT/ready<rank>, then sleeps until killed
(or until it finds itself fenced, which makes it exit with FENCED_EXIT_CODE)."""

import os
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from runtime.heartbeat import Heartbeat

rank = int(os.environ["RANK"])
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=timedelta(seconds=30))
Heartbeat(store, rank).start()
Path(os.environ["ADAPTLINK_TEST_OUT"], f"ready{rank}").touch()
while True:
    time.sleep(1)
