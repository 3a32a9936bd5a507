"""One rank of a run: load this device's share (and the backups it preloads), then serve.

`serve(plan, ctx, options)` is what `adaptlink.launch` calls on every rank once the
process group is up. The coordinator rank reads the prompts, drives the Coordinator,
appends each row to out.jsonl as its request finishes and writes the metrics on every
exit path (SIGTERM/SIGINT/SIGALRM end the run with error rows for what is unfinished);
every other rank runs its StageExecutor until told to stop.

Length: ~520 lines: a rank's run from load to metrics, each step a function; the
scheduling and the stage are apart (coordinator.py, scheduler.py, stage.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoProcessor

from adaptlink.model.blocks import LlavaBlocks, evict_page_cache
from adaptlink.model.config import PRESET_PREFIX
from adaptlink.model.emulation import DeadlinePadder
from adaptlink.model.measure import warm_up
from adaptlink.model.reference import eos_ids, load_generation_config
from partitioner.errors import AdaptLinkError
from partitioner.types import Plan
from runtime import messages
from runtime.auth import run_secret
from runtime.chat import ChatContext
from runtime.coordinator import Coordinator
from runtime.heartbeat import HB_KEY, Heartbeat, Membership, mark_dead, read_dead
from runtime.launcher import release_torchrun_exit_barrier
from runtime.messages import Kind, Refused, check, kind_of, message_cap
from runtime.requests import OutputError, RequestLimits, ResultWriter, completed_rows, id_key, read_prompts
from runtime.scheduler import BatchLimits, KVLedger, kv_budget
from runtime.secure_store import ForgedValueError
from runtime.serving import HttpOptions, HttpServer
from runtime.stage import StageExecutor
from runtime.transport import LinkEmulation, PeerFailure, Transport

log = logging.getLogger(__name__)

PLAN_HASH_KEY = "plan_hash"
LOADED_KEY = "loaded/{}"   # set by each rank once its blocks are loaded
RANK_STATS_KEY = "serve_stats/{}"  # serving: each worker's busy seconds and KV bytes, about once a second
RANK_STATS_S = 1.0
LOAD_TIMEOUT_S = 3600.0
LOAD_SILENCE_S = 30.0      # a rank whose heartbeat stays still this long while loading is dead


class PlanMismatchError(AdaptLinkError):
    pass


@dataclass
class ServeOptions:
    prompts: str | None = None
    out: str | None = None
    metrics: str | None = None
    in_flight: int | None = None          # default: the plan's workload.in_flight
    max_new_tokens: int = 32               # for requests that give none
    plan_path: str = "plan.json"
    recovery: str = "preloaded"            # or "cold": backups are not preloaded, loaded on failure
    cold_from_disk: bool = False           # cold: drop the checkpoint from the page cache first
    cold_read_bytes_per_s: float | None = None  # cold: emulate storage of this speed (pad the load)
    replay: str = "recompute"              # or "exact": replay with the original chunking
    resume: bool = False                   # keep out.jsonl's complete rows; serve only the other ids
    count_tokens: bool = False             # keep the store's `tokens` counter (an injection waits on it)
    batch: BatchLimits = field(default_factory=BatchLimits)  # micro-batch rows, tokens, how many in flight
    http: HttpOptions | None = None        # serve the OpenAI API (adaptlink serve) instead of reading prompts


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loaded_blocks(plan: Plan, rank: int, preload: bool = True) -> list[str]:
    """The blocks a rank materialises: its share and (preload) every share it backs up."""
    stage = plan.device(rank)
    ids = list(stage.blocks)
    for b in stage.backups if preload else ():
        ids += [x for x in b.blocks if x not in ids]
    return ids


def check_plan_hash(plan: Plan, rank: int, store, coordinator: int, path: str, timeout_s: float = 120,
                    ranks=()) -> None:
    """Every rank must run the coordinator's plan; refuse a different one, naming both hashes.

    Each rank publishes its hash and compares it with the coordinator's; the coordinator
    (given the group's `ranks`) also waits for every one's and refuses to serve if any differs,
    so a mismatch ends the run rather than looking like a dropout. On the run's SecureStore
    the hashes are sealed with the run secret: a stranger's `plan_hash` is never read
    (its name is not the key's) and a tampered value is refused."""
    try:
        _check_plan_hash(plan, rank, store, coordinator, path, timeout_s, ranks)
    except ForgedValueError as e:  # someone without the run secret wrote it
        raise AdaptLinkError(f"{path}: the plan hash in the run's store was tampered with ({e})") from None


def _check_plan_hash(plan, rank, store, coordinator, path, timeout_s, ranks) -> None:
    mine = plan.plan_hash()
    if rank == coordinator:
        store.set(PLAN_HASH_KEY, mine)
        others = [r for r in ranks if r != coordinator]
        keys = [f"{PLAN_HASH_KEY}/{r}" for r in others]
        if keys:
            try:
                store.wait(keys, timedelta(seconds=timeout_s))
            except Exception:
                missing = [r for r, k in zip(others, keys) if not store.check([k])]
                raise AdaptLinkError(f"{path}: rank(s) {missing} did not report their plan hash "
                                     f"within {timeout_s:.0f} s") from None
        bad = {r: h for r, k in zip(others, keys) if (h := store.get(k).decode()) != mine}
        if bad:
            raise PlanMismatchError(
                f"{path}: plan hash {mine[:12]} on the coordinator (rank {rank}) differs from rank(s) "
                + ", ".join(f"{r} ({h[:12]})" for r, h in sorted(bad.items()))
                + ": start every device with the same plan.json")
        return
    store.set(f"{PLAN_HASH_KEY}/{rank}", mine)
    store.wait([PLAN_HASH_KEY], timedelta(seconds=timeout_s))
    theirs = store.get(PLAN_HASH_KEY).decode()
    if theirs != mine:
        raise PlanMismatchError(
            f"{path}: plan hash {mine[:12]} on rank {rank} differs from the coordinator's {theirs[:12]}: "
            f"start every device with the same plan.json")


def _padder(stage):
    """Emulated slowdown: each block ends `slowdown` x its fastest time on this device alone
    (deadline padding: exact under contention, where padding `(k-1) x` the time taken drifts)."""
    slowdown = float((stage.emulation or {}).get("slowdown") or 1.0)
    if slowdown <= 1.0:
        return None
    sync = torch.cuda.synchronize if str(stage.torch_device).startswith("cuda") else None
    return DeadlinePadder(slowdown, sync=sync)


def serve(plan: Plan, ctx, opts: ServeOptions) -> int:

    rank, world, store = ctx.rank, ctx.world_size, ctx.store
    if world != len(plan.devices):
        raise AdaptLinkError(f"{opts.plan_path}: devices: the plan has {len(plan.devices)} devices "
                             f"but the run has {world} ranks")
    stage = plan.device(rank)
    secret = run_secret()  # before anything starts: a rank without the secret cannot join
    http = None
    if opts.http is not None and rank == plan.coordinator:
        if plan.model["source"].startswith(PRESET_PREFIX):
            raise AdaptLinkError(f"{opts.plan_path}: model.source {plan.model['source']}: a preset has no "
                                 f"tokenizer or chat template to serve; plan a checkpoint directory")
        http = HttpServer(opts.http).start()  # /health answers 503 "Loading model" from now on
    torch.set_num_threads(stage.threads)
    members = tuple(ctx.members) or tuple(range(world))
    if plan.coordinator not in members:
        raise AdaptLinkError(f"{opts.plan_path}: coordinator: rank {plan.coordinator} "
                             f"({plan.device(plan.coordinator).name}) died before joining: the run is over")
    check_plan_hash(plan, rank, store, plan.coordinator, opts.plan_path, ranks=members)
    hb = Heartbeat(store, rank, watch=plan.coordinator).start()  # a worker exits if the coordinator hangs
    membership = None

    # The transport first: its receiver takes messages while this rank loads, so a peer that
    # finished loading sooner never waits on this one in a gloo send (rendezvous) long
    # enough for its watchdog to take the load for a hang.
    rank_of = {s.name: s.rank for s in plan.devices}
    transport = Transport(rank, world, links=LinkEmulation.from_spec(plan.links, rank_of),
                          secret=secret, max_message_bytes=message_cap(plan, opts.batch), members=members)

    t_load = time.perf_counter()
    ids = loaded_blocks(plan, rank, preload=opts.recovery != "cold")
    blocks = LlavaBlocks.load(plan.model["source"], ids, dtype=stage.dtype, device=stage.torch_device,
                              seed=int(plan.model.get("seed", 0)))
    load_s = time.perf_counter() - t_load
    warmup_s = warm_up(blocks)  # before "loaded": the served clock starts with every rank warm
    log.info("rank %d (%s): loaded %d blocks (%d own) in %.2f s, %.1f MB of weights; warm-up %.2f s",
             rank, stage.name, len(ids), len(stage.blocks), load_s, blocks.param_bytes() / 1e6, warmup_s)
    store.set(LOADED_KEY.format(rank), f"{load_s:.3f}")

    def send(dst, header, tensors):
        try:
            transport.send(dst, header, tensors, block=False)
        except PeerFailure:
            pass  # the coordinator learns of it through its own transport and reroutes

    executor = StageExecutor(rank, blocks, plan.block_ranks(), plan.coordinator, send, pad=_padder(stage),
                             kv_budget=kv_budget(stage))
    stats = {"rank": rank, "name": stage.name, "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3)}
    try:
        if rank == plan.coordinator:
            _wait_loaded(store, world, rank, opts.plan_path)
            # heartbeats are judged from here on: a loading rank's beats can stall (imports, a
            # 2-core machine), which made false deaths at the 0.4 s threshold
            membership = Membership(store, world, rank=rank).start()
            membership.attach(transport)
            with torch.inference_mode():  # once for the run, not per block
                if http is not None:
                    return _serve_http(plan, ctx, opts, executor, transport, stats, membership, http)
                return _serve_coordinator(plan, ctx, opts, executor, transport, stats, membership)
        with torch.inference_mode():
            return _serve_worker(plan, rank, executor, transport, stats, opts, store)
    finally:
        if http is not None:
            http.stop()
        if membership is not None:
            membership.stop()
        hb.stop()
        transport.close(timeout=2.0)


def _wait_loaded(store, world: int, rank: int, path: str, timeout_s: float = LOAD_TIMEOUT_S,
                 silence_s: float = LOAD_SILENCE_S) -> None:
    """Coordinator: start serving (and the clock) once every live rank has loaded its blocks.

    A rank marked dead meanwhile (the launcher reaped it) is not waited for, nor one whose
    heartbeat has not moved for `silence_s` (it is marked dead here, so the Membership
    started next fences it and the run reroutes around it at once)."""
    keys = {r: LOADED_KEY.format(r) for r in range(world) if r != rank}
    deadline = time.monotonic() + timeout_s
    beats: dict[int, tuple[bytes | None, float]] = {}
    while True:
        now = time.monotonic()
        waiting = []
        for r, k in keys.items():
            if store.check([k]) or read_dead(store, r) is not None:
                continue
            beat = _read_beat(store, HB_KEY.format(r))
            if r not in beats or beats[r][0] != beat:
                beats[r] = (beat, now)
            elif now - beats[r][1] > silence_s:
                mark_dead(store, r, {"by": f"coordinator@{rank}", "reason": f"no heartbeat for "
                                     f"{now - beats[r][1]:.0f} s while loading", "time": time.time()})
                continue
            waiting.append(r)
        if not waiting:
            return
        if now > deadline:
            raise AdaptLinkError(f"{path}: rank(s) {waiting} did not load their blocks within {timeout_s:.0f} s")
        time.sleep(0.02)


def _read_beat(store, key: str) -> bytes | None:
    """A rank's beat, or None if it has none or it is forged (a SecureStore refuses it)."""
    try:
        return store.get(key) if store.check([key]) else None
    except ForgedValueError:
        return None


def _serve_worker(plan, rank, executor, transport, stats, opts, store=None) -> int:
    t0, cpu0 = time.perf_counter(), time.process_time()
    published = 0.0
    while True:
        if opts.http is not None and store is not None and time.perf_counter() - published > RANK_STATS_S:
            published = time.perf_counter()  # for the server's /metrics (what STATS carries only at the end)
            try:
                store.set(RANK_STATS_KEY.format(rank), json.dumps(
                    {"busy_s": executor.busy_s, "kv_bytes": executor.kv_bytes()}))
            except Exception as e:  # metrics only: the run does not depend on them
                log.debug("rank %d: stats not published: %s", rank, e)
        try:
            msg = transport.recv(timeout=1.0)
        except PeerFailure as e:
            if e.rank == plan.coordinator:
                log.error("rank %d: the coordinator failed; the run is over", rank)
                return 1
            continue  # the coordinator reroutes around it
        if msg is None:
            continue
        try:  # header fields and types, and whether msg.src may send this kind (runtime.messages)
            kind = check(msg.src, msg.header, me=rank, coordinator=plan.coordinator)
            if kind is Kind.ROUTE:
                try:
                    executor.set_routes(msg.header["routes"], msg.header["rv"])
                except ValueError as e:
                    raise Refused(kind, f"route v{msg.header['rv']} refused: {e}") from None
                continue
        except Refused as e:
            executor.refusals.add(msg.src, e)
            continue
        if kind is Kind.ACT:
            executor.handle(msg.header, msg.tensors, msg.src)
        elif kind is Kind.FREE:
            executor.free(msg.header["req"])
        elif kind is Kind.LOAD:  # cold recovery: take over a failed share from the checkpoint
            t = time.perf_counter()
            new = _load_cold(executor.blocks, plan, msg.header["blocks"], opts)
            stats["cold_load_s"] = round(time.perf_counter() - t, 3)
            log.warning("rank %d: loaded %d blocks cold in %.2f s", rank, len(new), stats["cold_load_s"])
            transport.send(plan.coordinator, messages.loaded(new), {}, block=False)
        elif kind is Kind.STOP:
            report = rank_report(stats, executor, transport, time.perf_counter() - t0, cpu0)
            transport.send(plan.coordinator, messages.stats(report), {}, block=True, timeout=10)
            return 0


# Exit codes of the coordinator (and so of `adaptlink run`); README "Exit codes".
EXIT_FATAL = 3       # the run ended before every request was served: a share with no live copy
                     # left, or out.jsonl / the metrics could not be written
EXIT_ALL_FAILED = 4  # the run ended, but no request produced a result
# A signal ends the run: every unfinished request gets this error; exit 128 + the signal.
# The launcher sends SIGALRM when --timeout is exceeded (SIGTERM/SIGINT: the user's).
STOP_SIGNALS = {signal.SIGTERM: "cancelled: SIGTERM", signal.SIGINT: "cancelled: SIGINT (Ctrl-C)",
                signal.SIGALRM: "cancelled: the run exceeded its --timeout"}
EXIT_TIMEOUT = 124   # as timeout(1)


def exit_code_for_signal(signum: int) -> int:
    return EXIT_TIMEOUT if signum == signal.SIGALRM else 128 + signum


def _serve_coordinator(plan, ctx, opts, executor, transport, stats, membership) -> int:
    """Serve the prompts; rows reach out.jsonl as requests finish, and the metrics file is
    written however the run ends (a signal, an unwritable output, an exception)."""
    got: dict = {"signal": None}
    coord = writer = None
    results, failed, kept, t0, cpu0 = [], [], [], time.perf_counter(), time.process_time()
    error = out_error = metrics_error = None
    previous = {}

    def on_signal(signum, frame) -> None:  # only a flag: the loop ends at its next turn
        got["signal"] = signum
        if coord is not None:
            coord.stop(STOP_SIGNALS[signum])

    try:
        processor, requests, failed, kept = _requests_for_run(plan, opts, executor)
        if opts.out:
            writer = ResultWriter(opts.out).start(kept + [(f.line, f.to_json()) for f in failed])

        def on_result(result) -> None:
            if writer is None or writer.failed is not None:
                return
            try:
                writer.add(result)
            except OutputError as e:  # the rows on disk stay whole; the run cannot go on usefully
                log.error("%s", e)
                coord.stop(f"not written: {e}")

        cold = opts.recovery == "cold"
        holders = {s.rank: set(loaded_blocks(plan, s.rank, preload=not cold)) for s in plan.devices}
        preferred = {s.rank: plan.backup_holder(s.rank) for s in plan.devices}
        coord = Coordinator(executor, transport, requests,
                            in_flight=opts.in_flight or plan.workload.in_flight,
                            holders=holders, preferred=preferred,
                            tokenizer=processor.tokenizer if processor else None, store=ctx.store,
                            names={s.rank: s.name for s in plan.devices},
                            cold_load=(lambda ids: _load_cold(executor.blocks, plan, ids, opts)) if cold else None,
                            replay=opts.replay, count_tokens=opts.count_tokens, on_result=on_result,
                            limits=opts.batch, kv_ledger=lambda routes: KVLedger.for_plan(
                                plan, routes, *executor.blocks.kv_shape()))
        previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}  # kept until the end
        t0, cpu0 = time.perf_counter(), time.process_time()
        results = coord.run()
    except OutputError as e:  # out.jsonl could not be begun (or, with --resume, read)
        out_error = str(e)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        if coord is not None:  # every request not yet written gets its error row
            coord.fail_unfinished(f"the coordinator failed: {error}")
            results = [coord.results[i] for i in sorted(coord.results)]
        raise
    finally:
        wall = time.perf_counter() - t0
        membership.stop()
        dead = sorted(coord.dead) if coord is not None else []
        release_torchrun_exit_barrier(ctx.store, dead)
        if writer is not None:
            try:
                writer.close()
            except OutputError as e:
                out_error = str(e)
        own = rank_report(stats, executor, transport, wall, cpu0)
        reports = _collect_reports(ctx, transport, own, dead)
        metrics = _metrics(plan, opts, coord, results, failed, wall, reports)
        if error is not None:
            metrics["fatal"] = f"the coordinator failed: {error}"
        elif out_error is not None and metrics["fatal"] is None:
            metrics["fatal"] = f"not written: {out_error}"
        metrics["signal"] = signal.Signals(got["signal"]).name if got["signal"] else None
        metrics["resumed"] = len(kept)
        if opts.metrics:
            try:
                write_metrics(opts.metrics, metrics)
            except OutputError as e:
                metrics_error = str(e)
        if error is None:
            _print_summary(metrics, plan)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for problem in (out_error, metrics_error):
        if problem is not None:
            print(f"adaptlink: error: {problem}", file=sys.stderr)
    if got["signal"] is not None:
        return exit_code_for_signal(got["signal"])
    if metrics["fatal"] is not None or metrics_error:
        return EXIT_FATAL
    if metrics["requests"] and not metrics["completed"] and not kept:
        print(f"adaptlink: error: every one of the {metrics['requests']} requests failed "
              f"(their errors are in {opts.out or 'out.jsonl'})", file=sys.stderr)
        return EXIT_ALL_FAILED
    return 0


def _coordinator(plan, ctx, opts, executor, transport, **kw) -> Coordinator:
    cold = opts.recovery == "cold"
    holders = {s.rank: set(loaded_blocks(plan, s.rank, preload=not cold)) for s in plan.devices}
    preferred = {s.rank: plan.backup_holder(s.rank) for s in plan.devices}
    return Coordinator(executor, transport, kw.pop("requests", []),
                       in_flight=opts.in_flight or plan.workload.in_flight,
                       holders=holders, preferred=preferred, store=ctx.store,
                       names={s.rank: s.name for s in plan.devices},
                       cold_load=(lambda ids: _load_cold(executor.blocks, plan, ids, opts)) if cold else None,
                       replay=opts.replay, count_tokens=opts.count_tokens,
                       limits=opts.batch, kv_ledger=lambda routes: KVLedger.for_plan(
                           plan, routes, *executor.blocks.kv_shape()), **kw)


def _serve_http(plan, ctx, opts, executor, transport, stats, membership, http) -> int:
    """Serve the OpenAI API until SIGTERM / Ctrl-C (a drain: exit 0) or a fatal end (a block
    with no live copy: EXIT_FATAL). The engine loop runs here, uvicorn on its own thread."""
    live = http.engine
    processor = AutoProcessor.from_pretrained(plan.model["source"], local_files_only=True)
    config = executor.blocks.config
    eos = frozenset(eos_ids(config, load_generation_config(plan.model["source"], config)))
    chat = ChatContext(processor, http.options.model_name, RequestLimits.from_config(config).context,
                       opts.max_new_tokens, eos, remote_images=http.options.remote_images,
                       media_dir=http.options.media_dir)
    coord = _coordinator(plan, ctx, opts, executor, transport, tokenizer=processor.tokenizer,
                         on_result=live.on_result, live=True, on_token=live.on_token, on_batch=live.on_batch,
                         on_turn=live.flush)
    got: dict = {"signal": None, "timer": None}

    def on_signal(signum, frame) -> None:  # the first drains, a second one (or the deadline) cancels
        if got["signal"] is None:
            got["signal"] = signum
            log.warning("%s: draining (no new requests; %.0f s for the running ones)",
                        signal.Signals(signum).name, http.options.drain_s)
            live.drain()
            got["timer"] = threading.Timer(http.options.drain_s, coord.stop, ("cancelled: the server shut down",))
            got["timer"].daemon = True
            got["timer"].start()
        else:
            coord.stop(STOP_SIGNALS[signum])

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0, cpu0 = time.perf_counter(), time.process_time()
    done = threading.Event()
    threading.Thread(target=_read_rank_stats, args=(ctx.store.clone(), plan, coord, live, done),
                     name="rank-stats", daemon=True).start()
    live.attach(coord, chat)
    log.warning("ready: %s on %s", http.options.model_name, ", ".join(s.name for s in plan.devices))
    try:
        coord.run()
    finally:
        live.ended(coord.fatal if got["signal"] is None else None)
        done.set()
        if got["timer"] is not None:
            got["timer"].cancel()
        wall = time.perf_counter() - t0
        http.stop()  # the open responses end first (their last events are queued)
        membership.stop()
        release_torchrun_exit_barrier(ctx.store, sorted(coord.dead))
        own = rank_report(stats, executor, transport, wall, cpu0)
        reports = _collect_reports(ctx, transport, own, sorted(coord.dead))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if opts.metrics:  # the coordinator keeps no rows while serving: the server counted them
        write_metrics(opts.metrics, {**_metrics(plan, opts, coord, [], [], wall, reports), **live.totals(wall)})
    if coord.fatal is not None and got["signal"] is None:
        print(f"adaptlink: error: {coord.fatal}", file=sys.stderr)
        return EXIT_FATAL
    return 0


def _read_rank_stats(store, plan, coord, live, done: threading.Event) -> None:
    """Serving: every worker's published busy seconds and KV bytes, into `live.rank_stats`."""
    while not done.wait(RANK_STATS_S):
        for s in plan.devices:
            if s.rank == plan.coordinator or s.rank in coord.dead:
                continue
            key = RANK_STATS_KEY.format(s.rank)
            try:
                if store.check([key]):
                    live.rank_stats[s.rank] = json.loads(store.get(key))
            except Exception as e:  # metrics only (a forged value, a store gone at the end)
                log.debug("stats of rank %d not read: %s", s.rank, e)


def _requests_for_run(plan, opts, executor):
    """(processor, requests to serve, results for bad lines, rows kept by --resume as (line, row)).

    --resume keeps each request whose id has a complete (error-free) row in the existing
    out.jsonl; only the others are served."""
    processor = None
    if not plan.model["source"].startswith(PRESET_PREFIX):
        processor = AutoProcessor.from_pretrained(plan.model["source"], local_files_only=True)
    config = executor.blocks.config  # stop ids as generate reads them: generation_config.json first
    requests, failed = read_prompts(opts.prompts, processor, default_max_new_tokens=opts.max_new_tokens,
                                    eos_token_ids=frozenset(eos_ids(config, load_generation_config(
                                        plan.model["source"], config))),
                                    limits=RequestLimits.from_config(config))
    kept = []
    if opts.resume and opts.out:
        done = completed_rows(opts.out)
        kept = [(r.line, done[id_key(r.id)]) for r in requests if id_key(r.id) in done]
        requests = [r for r in requests if id_key(r.id) not in done]
        for i, r in enumerate(requests):
            r.index = i
        log.warning("--resume: %d requests already complete in %s, %d to serve", len(kept), opts.out,
                    len(requests))
    return processor, requests, failed, kept


def rank_report(stats: dict, executor, transport, wall: float, cpu0: float) -> dict:
    """One rank's numbers at the end: its stage's, and the process's wall and CPU seconds
    since it began serving (`cpu_s`: every thread of it, the HTTP server's included)."""
    return {**stats, **executor.stats(), "wall_s": wall, "idle_s": max(0.0, wall - executor.busy_s),
            "cpu_s": round(time.process_time() - cpu0, 3), "peak_rss_bytes": peak_rss_bytes(),
            "transport": _jsonable(transport.stats())}


def _collect_reports(ctx, transport, own: dict, dead: list[int]) -> dict:
    """Stop the other ranks and collect their numbers (10 s at most); `own`: this rank's."""
    reports = {ctx.rank: own}
    alive = [r for r in range(ctx.world_size) if r != ctx.rank and r not in dead]
    for r in alive:
        try:
            transport.send(r, messages.stop(), {}, block=False)
        except PeerFailure:
            pass
    deadline = time.perf_counter() + 10
    while len(reports) < 1 + len(alive) and time.perf_counter() < deadline:
        try:
            msg = transport.recv(timeout=0.2)
        except PeerFailure:
            continue
        if msg is not None and kind_of(msg.header) is Kind.STATS and isinstance(msg.header.get("stats"), dict):
            reports[msg.src] = msg.header["stats"]
    return reports


def _metrics(plan, opts, coord, results, failed, wall: float, reports: dict) -> dict:
    """The run's numbers; `coord` is None when it ended before serving (they are zeros then)."""
    rows = results + failed  # one per request line served (ids may repeat: a duplicate is an error line)
    ok = [r for r in results if r.error is None]
    tokens = sum(len(r.tokens) for r in ok)
    return {
        "plan": opts.plan_path, "plan_hash": plan.plan_hash(), "method": plan.method,
        "emulated": plan.emulated, "requests": len(rows), "completed": len(ok),
        "failed": len(rows) - len(ok), "wall_s": round(wall, 4),
        "requests_per_s": round(len(ok) / wall, 4) if wall else None,
        "tokens_per_s": round(tokens / wall, 4) if wall else None,
        "in_flight": coord.in_flight if coord else None, "predicted": plan.predicted,
        "recovery": opts.recovery, "replay": opts.replay, "t0_wall": coord.t0_wall if coord else None,
        "failovers": [f.to_json() for f in coord.failovers] if coord else [],
        "replay_mismatches": coord.replay_mismatches if coord else 0,
        "token_times_s": [round(t, 4) for t in coord.token_times] if coord else [],
        "batching": _batching(opts, coord),
        "ranks": {str(r): reports[r] for r in sorted(reports)},
        "fatal": coord.fatal if coord else None, "unfinished": coord.unfinished if coord else [],
    }


def _batching(opts, coord) -> dict:
    """Micro-batches sent: their count, rows and tokens, how many were in the pipeline; the
    admission queue's longest; each stage's KV reserved (the ranks' own KV bytes are in `ranks`)."""
    log_ = coord.batch_log if coord else []
    n = len(log_)
    return {"max_rows": opts.batch.rows, "max_tokens": opts.batch.tokens,
            "micro_batches_in_flight": opts.batch.in_flight(coord.stages) if coord else None,
            "micro_batches": n,
            "rows_per_batch_mean": round(sum(r for r, _, _ in log_) / n, 3) if n else 0,
            "rows_per_batch_max": max((r for r, _, _ in log_), default=0),
            "tokens_per_batch_mean": round(sum(t for _, t, _ in log_) / n, 3) if n else 0,
            "in_flight_mean": round(sum(f for _, _, f in log_) / n, 3) if n else 0,
            "queue_peak": coord.queue_peak if coord else 0,
            "kv_ledger": {str(r): v for r, v in coord.kv.stats().items()} if coord and coord.kv else {}}


def write_metrics(path, metrics: dict) -> None:
    """The metrics file, all or nothing (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None


def _load_cold(blocks, plan, ids: list[str], opts: ServeOptions) -> list[str]:
    source = plan.model["source"]
    t0 = time.perf_counter()
    if opts.cold_from_disk:
        evict_page_cache(source)
    before = blocks.param_bytes()
    new = blocks.add(source, ids, int(plan.model.get("seed", 0)))
    if opts.cold_read_bytes_per_s:  # emulated storage: no faster than reading the bytes at that speed
        time.sleep(max(0.0, (blocks.param_bytes() - before) / opts.cold_read_bytes_per_s - (time.perf_counter() - t0)))
    return new


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _print_summary(m: dict, plan) -> None:
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 140
    label = " (emulated devices/links)" if m["emulated"] else ""
    t = Table(title=f"{m['completed']}/{m['requests']} requests in {m['wall_s']:.2f} s: "
                    f"{m['requests_per_s']} req/s, {m['tokens_per_s']} tok/s, {m['in_flight']} in flight{label}")
    for c in ("rank", "device", "blocks", "busy s", "idle s", "peak RSS", "sent"):
        t.add_column(c, justify="left" if c in ("device", "blocks") else "right")
    for r, rep in m["ranks"].items():
        stage = plan.device(int(r))
        sent = rep.get("transport", {}).get("sent", {})
        sent_s = ", ".join(f"->{d}: {v['bytes'] / 1e6:.2f} MB" for d, v in sent.items()) or "-"
        busy = rep.get("busy_s", 0.0)
        t.add_row(r, stage.name, f"{len(stage.blocks)}", f"{busy:.2f}", f"{max(0.0, rep.get('wall_s', 0) - busy):.2f}",
                  f"{rep.get('peak_rss_bytes', 0) / 1e6:.0f} MB", sent_s)
    console.print(t)
    for f in m["failovers"]:
        console.print(f"[yellow]failover[/]: rank {f['rank']} lost at {f['detected_at']:.3f} s; "
                      f"{len(f['rerouted'])} blocks rerouted, {len(f['replayed'])} requests replayed")
    if m["fatal"]:
        console.print(f"[red]run failed[/]: {m['fatal']}; {len(m['unfinished'])} requests unfinished "
                      f"(error lines in out.jsonl): {', '.join(map(str, m['unfinished']))}")
