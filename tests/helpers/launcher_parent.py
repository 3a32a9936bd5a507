"""A launcher process to be SIGKILLed by a test: `launcher_parent.py OUT_DIR WORLD_SIZE`.

Runs launch_local over env_child.py ranks that sleep forever; the test kills this process
and checks that the ranks die with it (PR_SET_PDEATHSIG).
"""

import sys
from pathlib import Path

from runtime.launcher import launch_local

out, world = sys.argv[1], int(sys.argv[2])
launch_local([sys.executable, str(Path(__file__).with_name("env_child.py")), *["inf"] * world], world,
             env={"ADAPTLINK_TEST_OUT": out}, timeout_s=120)
