"""What this process is in a run, read once from its environment.

A process of `python -m adaptlink.launch` is one of:
- the launcher (`adaptlink run`, or a plain `python -m adaptlink.launch`): it starts one
  child per device (`runtime.launcher.Launcher`);
- a launcher child: one device's rank, started by that launcher (`ADAPTLINK_LAUNCHER`);
- a rank under torchrun: torchrun started it (`WORLD_SIZE`, `TORCHELASTIC_RUN_ID`, ...).
Among the ranks, the coordinator (the plan's, or `ADAPTLINK_COORDINATOR` under the
launcher) serves the requests; the others are workers.

    role = process_role()
    if role.is_rank(len(plan.devices)): ...     # else: launch the ranks
    role.under_launcher, role.rank, role.local_world_size

The launcher writes the variables read here (`Launcher.rank_env`, with these names).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Mapping

LAUNCHER_ENV = "ADAPTLINK_LAUNCHER"        # "1" in every child of runtime.launcher.Launcher
COORDINATOR_ENV = "ADAPTLINK_COORDINATOR"  # the coordinator's rank, set by that launcher


class StartedBy(enum.Enum):
    LAUNCHER = "launcher"   # a child of runtime.launcher.Launcher
    TORCHRUN = "torchrun"   # WORLD_SIZE set without the launcher: torchrun (or by hand)
    NONE = "none"           # a plain process: it becomes the launcher


@dataclass(frozen=True, slots=True)
class Role:
    """This process's place in a run (see the module docstring); None where the variable is unset."""

    started_by: StartedBy
    rank: str | None = None                 # RANK, as set (parse with int())
    world_size: str | None = None           # WORLD_SIZE
    local_world_size: int = 1               # LOCAL_WORLD_SIZE: device processes under one agent
    coordinator: str | None = None          # ADAPTLINK_COORDINATOR (under the launcher)
    run_id: str | None = None               # TORCHELASTIC_RUN_ID (under torchrun's agent)
    restart_count: str = "0"                # TORCHELASTIC_RESTART_COUNT: the join attempt

    @property
    def under_launcher(self) -> bool:
        return self.started_by is StartedBy.LAUNCHER

    @property
    def under_torchrun(self) -> bool:
        return self.started_by is StartedBy.TORCHRUN

    @property
    def is_launcher_coordinator(self) -> bool:
        """A launcher child that is the run's coordinator (the launcher said which rank)."""
        return self.under_launcher and self.rank == self.coordinator

    def is_rank(self, n_devices: int) -> bool:
        """Whether this process is one device of a run of `n_devices` (else it launches them):
        a launcher child, or torchrun with one process per device; a 1-device plan under
        torchrun runs in place, a plain process with WORLD_SIZE=1 launches."""
        if self.under_launcher:
            return True
        return (self.world_size is not None and int(self.world_size) == n_devices
                and (n_devices > 1 or self.run_id is not None))

    @property
    def rank_index(self) -> int:
        """RANK as a number (0 when unset)."""
        return int(self.rank) if self.rank is not None else 0

    def is_coordinator(self, coordinator: int) -> bool:
        """Whether this process is rank `coordinator` (the plan's) of a run."""
        return self.rank == str(coordinator)

    @property
    def single_agent(self) -> bool:
        """Under torchrun with one device process per agent (one torchrun per device)."""
        return self.local_world_size == 1


def process_role(env: Mapping[str, str] = os.environ) -> Role:
    """This process's Role, from `env` (the process's environment by default)."""
    if env.get(LAUNCHER_ENV):
        started_by = StartedBy.LAUNCHER
    elif env.get("WORLD_SIZE") is not None:
        started_by = StartedBy.TORCHRUN
    else:
        started_by = StartedBy.NONE
    return Role(started_by, rank=env.get("RANK"), world_size=env.get("WORLD_SIZE"),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
                coordinator=env.get(COORDINATOR_ENV), run_id=env.get("TORCHELASTIC_RUN_ID"),
                restart_count=env.get("TORCHELASTIC_RESTART_COUNT", "0"))
