"""Run a multi-rank scenario of tests/helpers/transport_worker.py under runtime.launcher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.auth import SECRET_ENV, RunSecret
from runtime.launcher import KillSpec, LaunchResult, launch_local

WORKER = Path(__file__).with_name("transport_worker.py")


def run_scenario(scenario: str, world_size: int, out_dir: Path, *, inject: list[KillSpec] = (),
                 timeout_s: float = 60.0, env: dict[str, str] | None = None) -> tuple[LaunchResult, dict]:
    """Launch `world_size` ranks of `scenario`; returns the launch result and rank 0's
    result.json. Each rank's output is in out_dir/rank<r>.log, printed on failure."""
    env = dict(env or {})
    # a secret given is the run's: the launcher's store must be keyed with it too
    secret = RunSecret.from_hex(env.pop(SECRET_ENV), SECRET_ENV) if SECRET_ENV in env else None
    result = launch_local([sys.executable, str(WORKER), scenario], world_size,
                          env={"ADAPTLINK_TEST_OUT": str(out_dir), **env}, inject=list(inject),
                          timeout_s=timeout_s, log_dir=out_dir, secret=secret)
    res_path = out_dir / "result0.json"
    if not result.ok or not res_path.exists():
        logs = "\n".join(f"--- rank {r}\n{(out_dir / f'rank{r}.log').read_text()[-3000:]}"
                         for r in range(world_size))
        raise AssertionError(f"{scenario} failed: {result}\n{logs}")
    return result, json.loads(res_path.read_text())
