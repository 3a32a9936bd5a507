"""The MIP solvers behind the placement ILP (partitioner/ilp.py): CBC and HiGHS through pulp.

`solve(prob, solver, ...)` runs one solver on a built pulp problem and answers in one shape
for both: {"status": optimal | feasible | infeasible | no solution, "objective", "bound",
"gap" (when the solver gives them), "result" (the solver's own word), "seconds"}.

- CBC (`solver="cbc"`): pulp's COIN_CMD on the `cbc` on PATH, else pulp's bundled one. Its
  bound, gap and result line are parsed from its log file (pulp reports neither).
- HiGHS (`solver="highs"`): pulp's interface to highspy (`pip install highspy`, the
  adaptlink[highs] extra); bound and gap from `Highs.getInfo()` (mip_dual_bound, mip_gap).

Both run with zero gap tolerance. A time limit that passes before the MIP's root finishes
leaves no bound (the key is then absent). See docs/DESIGN.md ("The planner").
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import pulp

from partitioner.errors import PlanError

log = logging.getLogger(__name__)


SOLVERS = {"cbc": "CBC", "highs": "HiGHS"}
"""--solver choices -> the name a plan's solver.name records."""


def check_solver(solver: str) -> None:
    """PlanError (one line, naming --solver) unless `solver` can run here."""
    if solver not in SOLVERS:
        raise PlanError(f"--solver: must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver == "highs" and not _highspy_available():
        raise PlanError("--solver highs: HiGHS is not installed here (pulp drives it through the highspy "
                        "package): pip install highspy (or the adaptlink[highs] extra), or use --solver cbc")


def _highspy_available() -> bool:
    try:
        return pulp.HiGHS(msg=False).available()
    except Exception:  # pulp's stub without highspy, or a broken install
        return False


def solve(prob: pulp.LpProblem, solver: str, time_limit_s: float | None, threads: int | None = None,
          warm: bool = False) -> dict:
    """One run of `solver` (a `SOLVERS` key) on `prob`, its status mapped to optimal |
    feasible | infeasible | no solution (the module docstring gives the answer's keys)."""
    t0 = time.perf_counter()
    name = SOLVERS[solver]
    run = _run_highs if solver == "highs" else _run_cbc
    try:
        info, proven_infeasible = run(prob, time_limit_s, threads, warm)
    except pulp.PulpSolverError as e:  # the solver itself failed (CBC, seen on large models): no answer
        log.warning("%s failed: %s", name, str(e).splitlines()[0])
        return {"status": "no solution", "result": f"{name} failed", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    # both report the bound without the objective's constant term
    const = prob.objective.constant if prob.objective is not None else 0.0
    if "bound" in info:
        info["bound"] += const
    status = pulp.LpStatus[prob.status]
    sol = prob.sol_status
    if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        info["objective"] = pulp.value(prob.objective)
    if sol == pulp.LpSolutionOptimal:
        info["status"] = "optimal"
    elif sol == pulp.LpSolutionIntegerFeasible:
        info["status"] = "feasible"
    elif proven_infeasible or (
            solver == "cbc"
            and (status == "Infeasible" or info.get("result", "").startswith("Problem proven infeasible"))
            and (time_limit_s is None or seconds < time_limit_s)):
        info["status"] = "infeasible"
    elif status == "Infeasible" and solver == "cbc":
        # CBC 2.10 says "Pre-processing says infeasible" when its time runs out in the
        # cut generators (seen on 32 devices of the 7B graph, 4 s limit): not a proof
        info["status"] = "no solution"
        info["result"] = "stopped at the time limit (CBC's 'infeasible' then is no proof)"
    else:
        info["status"] = "no solution"
    info["seconds"] = seconds
    log.debug("%s: %s in %.3f s (%s)", name, info["status"], seconds, info.get("result"))
    return info


# -- CBC ------------------------------------------------------------------------------------

def _run_cbc(prob, time_limit_s, threads, warm) -> tuple[dict, bool]:
    """CBC through pulp; bound, gap and result line parsed from its log."""
    fd, log_path = tempfile.mkstemp(prefix="adaptlink_cbc_", suffix=".log")
    os.close(fd)
    try:
        prob.solve(_cbc_solver(time_limit_s, threads, log_path, warm))
        with open(log_path) as f:
            info = parse_cbc_log(f.read())
    finally:
        os.unlink(log_path)
    # time-limit caveat in solve(): CBC's "infeasible" is a proof only within the limit
    return info, False


def _cbc_solver(time_limit_s: float | None, threads: int | None, log_path: str | None, warm: bool):
    path = shutil.which("cbc") or pulp.PULP_CBC_CMD.pulp_cbc_path
    # every core by default: on 16 devices of the 7B graph, 2 threads solved in 7-9 s what
    # 1 thread took 17 s, or did not prove within 30 s
    threads = threads or os.cpu_count() or 1
    return pulp.COIN_CMD(path=path, msg=False, timeLimit=time_limit_s, threads=threads,
                         logPath=log_path, warmStart=warm, gapRel=0.0, gapAbs=0.0)


_CBC_LINES = {"result": r"^Result - (.*)$", "objective": r"^Objective value:\s*(\S+)",
              "bound": r"^Lower bound:\s*(\S+)", "gap": r"^Gap:\s*(\S+)", "nodes": r"^Enumerated nodes:\s*(\S+)"}


def parse_cbc_log(text: str) -> dict:
    """The result line, objective, lower bound, gap and node count of a CBC log (those found)."""
    out: dict = {}
    for key, pat in _CBC_LINES.items():
        m = re.search(pat, text, re.M)
        if m:
            try:
                out[key] = m.group(1).strip() if key == "result" else float(m.group(1))
            except ValueError:
                pass
    return out


# -- HiGHS ----------------------------------------------------------------------------------

def _run_highs(prob, time_limit_s, threads, warm) -> tuple[dict, bool]:
    """HiGHS through pulp (highspy); bound and gap from Highs.getInfo(). HiGHS stops at
    its time limit with status "time limit", so its "infeasible" is always a proof."""
    # imported here: highspy is optional (check_solver says how to get it)
    import highspy

    prob.solve(_highs_solver(time_limit_s, threads, warm))
    h = prob.solverModel
    status = h.getModelStatus()
    info: dict = {"result": h.modelStatusToString(status)}
    hi = h.getInfo()
    if math.isfinite(hi.mip_dual_bound) and abs(hi.mip_dual_bound) < highspy.kHighsInf:
        info["bound"] = float(hi.mip_dual_bound)
    if math.isfinite(hi.mip_gap) and hi.mip_gap < highspy.kHighsInf:
        info["gap"] = float(hi.mip_gap)
    proven = status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible)
    return info, proven  # (unbounded is impossible: every objective is >= 0)


_HIGHS_BANNER_DONE = False


def _highs_solver(time_limit_s: float | None, threads: int | None, warm: bool):
    """pulp's HiGHS (highspy) with zero gap tolerance; `warm` hands HiGHS the integer
    variables' current values as a MIP start (pulp's HiGHS interface has no warm start)."""
    class HiGHSWarm(pulp.HiGHS):
        def createAndConfigureSolver(self, lp):
            global _HIGHS_BANNER_DONE
            if _HIGHS_BANNER_DONE:
                return super().createAndConfigureSolver(lp)
            # the first Highs() of a process prints a banner on fd 1, before output_flag can
            # be set: it would land in `adaptlink plan --json`'s stdout
            sys.stdout.flush()
            saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                super().createAndConfigureSolver(lp)
            finally:
                os.dup2(saved, 1)
                os.close(saved), os.close(devnull)
            _HIGHS_BANNER_DONE = True

        def callSolver(self, lp):
            if warm:
                start = [(v.index, float(round(v.varValue))) for v in lp.variables()
                         if v.cat == pulp.LpInteger and v.varValue is not None]
                if start:
                    idx, val = zip(*start)
                    lp.solverModel.setSolution(len(idx), np.array(idx, dtype=np.int32),
                                               np.array(val, dtype=np.float64))
            super().callSolver(lp)

    # threads only when asked: HiGHS's thread pool is process-wide, set once
    return HiGHSWarm(msg=False, timeLimit=time_limit_s, gapRel=0.0, gapAbs=0.0, threads=threads)
