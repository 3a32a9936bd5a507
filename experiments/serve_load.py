"""Load test of `adaptlink serve`: N concurrent `openai` async clients for a bounded time.

Starts `adaptlink serve` on 127.0.0.1 (a tiny random-weight LLaVA over 3 devices, rank 1
and rank 2 backing each other up, unless --plan is given), runs N clients, each sending
one request after another until the time is up (a fixed mix: every 3rd request carries
an image, every 2nd streams; greedy, so each prompt's answer is known), and reports
requests/s, tokens/s, p50/p99 TTFT and inter-token latency (streams), the longest stall
between two tokens of any stream, errors, and answers that differ from the same prompt's
answer in the clean phase. `--kill-at S` SIGKILLs a device (rank 2 by default) S seconds
into a second load phase, as `adaptlink serve --inject` would. `--compare-run` then serves
the clean phase's requests with `adaptlink run` (the same plan, --in-flight N) for tokens/s
against it; `--rounds K` repeats (a fresh server's clean phase, then that run) K times,
alternating the two in time on this noisy machine, and reports each ratio and their median.
The clients use the SDK's aiohttp transport (`--http httpx` for its default): they share
this machine's cores with the server.

    python experiments/serve_load.py --clients 8 --duration 20
    python experiments/serve_load.py --clients 16 --duration 60 --kill-at 30 --compare-run --rounds 3

Bounded: --duration seconds of load (each request's max_tokens is --max-tokens), the
server is stopped (SIGTERM, a drain) at the end, everything on 127.0.0.1. Writes
experiments/results/serve_load/<label>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptlink.model.samples import sample_images  # noqa: E402
from adaptlink.plans import chain_shares, manual_plan, write_plan  # noqa: E402
from runtime.launcher import free_port  # noqa: E402

PROMPTS = ["Tell me about the sea", "What is shown here?", "Once upon a time", "Describe the colours",
           "The lighthouse keeper", "Count to ten", "Why is the sky blue?", "Write a short poem"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def job(k: int, urls: list[str]) -> tuple[str, list[dict], int | None, bool]:
    """The k-th request of the mix: (key, messages, image index, stream); `urls` are the
    images' data URLs, encoded once."""
    text = PROMPTS[k % len(PROMPTS)]
    img = (k // 3) % len(urls) if k % 3 == 0 else None
    content = text if img is None else [{"type": "image_url", "image_url": {"url": urls[img]}},
                                        {"type": "text", "text": text}]
    return f"{text}|{img}", [{"role": "user", "content": content}], img, k % 2 == 0


def make_client(base: str, http: str = "aiohttp", timeout: float = 120) -> openai.AsyncOpenAI:
    """The official async client against `base`: on its aiohttp transport (`openai[aiohttp]`,
    the SDK's choice "for improved concurrency performance": a C HTTP parser) or its default
    httpx one. The clients share this machine's cores with the server, so what they cost
    per token is kept low."""
    kw = {}
    if http == "aiohttp":
        try:
            kw["http_client"] = openai.DefaultAioHttpClient(timeout=timeout)
        except (AttributeError, RuntimeError) as e:  # an SDK without it, or without its extra installed
            raise SystemExit(f"--http aiohttp: {e} (pip install 'openai[aiohttp]', or --http httpx)")
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout, **kw)


class Load:
    def __init__(self, base: str, model: str, images, max_tokens: int, http: str = "aiohttp"):
        self.client = make_client(base, http)
        self.model, self.urls, self.max_tokens = model, [data_url(im) for im in images], max_tokens
        self.done: list[dict] = []
        self.errors: list[str] = []
        self.answers: dict[str, set[str]] = {}
        self.ttft, self.itl, self.stalls = [], [], []
        self.started, self.t0 = 0, time.perf_counter()

    async def one(self, k: int) -> None:
        key, messages, _, stream = job(k, self.urls)
        self.started += 1
        t0 = time.perf_counter()
        try:
            if stream:
                text, n, last, first = "", 0, None, None
                s = await self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                async for c in s:
                    now = time.perf_counter()
                    if c.choices and c.choices[0].delta.content:
                        if first is None:
                            first = now - t0
                        elif last is not None:
                            self.itl.append(now - last)
                        last = now
                        text += c.choices[0].delta.content
                    if c.usage:
                        n = c.usage.completion_tokens
                if first is not None:
                    self.ttft.append(first)
            else:
                r = await self.client.chat.completions.create(model=self.model, messages=messages,
                                                              max_tokens=self.max_tokens, temperature=0)
                text, n = r.choices[0].message.content, r.usage.completion_tokens
        except Exception as e:  # every failure is counted: the test's point
            self.errors.append(f"{type(e).__name__}: {e}"[:300])
            return
        now = time.perf_counter()
        self.done.append({"key": key, "tokens": n, "latency": now - t0, "stream": stream, "at": now - self.t0})
        self.answers.setdefault(key, set()).add(text)

    async def client_loop(self, c: int, clients: int, until: float) -> None:
        k = c
        while time.perf_counter() < until:
            await self.one(k)
            k += clients

    async def run(self, clients: int, seconds: float, on_mid=None) -> float:
        t0 = self.t0 = time.perf_counter()
        tasks = [asyncio.create_task(self.client_loop(c, clients, t0 + seconds)) for c in range(clients)]
        if on_mid is not None:
            await asyncio.sleep(on_mid[0])
            on_mid[1]()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        await self.client.close()
        return wall


def summary(load: Load, wall: float, reference: dict[str, set[str]] | None) -> dict:
    tokens = sum(d["tokens"] for d in load.done)
    differ = 0
    if reference is not None:
        differ = sum(1 for k, texts in load.answers.items() if k in reference and texts != reference[k])
    return {"requests": len(load.done), "started": load.started, "errors": len(load.errors),
            "error_samples": load.errors[:5], "lost": load.started - len(load.done) - len(load.errors),
            "wall_s": round(wall, 3), "requests_per_s": round(len(load.done) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "tokens": tokens,
            "ttft_p50_s": pct(load.ttft, 0.5), "ttft_p99_s": pct(load.ttft, 0.99),
            "itl_p50_s": pct(load.itl, 0.5), "itl_p99_s": pct(load.itl, 0.99),
            "longest_stall_s": round(max(load.itl), 4) if load.itl else None,
            "answers_differing_from_clean": differ, "tokens_per_s_by_10s": by_10s(load.done, wall)}


def by_10s(done: list[dict], wall: float) -> list[float]:
    """Tokens/s in each 10 s of the phase (a request's tokens counted when it ends): whether
    the rate holds over the phase."""
    bins = [0] * max(1, int(wall // 10) + 1)
    for d in done:
        bins[min(len(bins) - 1, int(d["at"] // 10))] += d["tokens"]
    return [round(b / 10, 1) for b in bins]


def run_loop(coro):
    """The clients' event loop: uvloop where installed (as the server's). The clients share
    this machine's cores with the server, so their own CPU is kept low (`cores_busy`)."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def wait_ready(base: str, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"adaptlink serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    raise SystemExit("adaptlink serve was not ready in time")


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank):
                return p.pid
        except psutil.Error:
            continue
    return None


def cpu_seconds(launcher_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the load clients), the launcher,
    and each rank of the server."""
    def used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    out = {"clients": used(psutil.Process())}
    try:
        launcher = psutil.Process(launcher_pid)
        out["launcher"] = used(launcher)
        for p in launcher.children(recursive=True):
            try:
                out[f"rank{p.environ().get('RANK', '?')}"] = used(p)
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores each process kept busy over a phase (CPU seconds / wall seconds)."""
    return {k: round((after[k] - before.get(k, 0.0)) / wall, 3) for k in after if k in before}


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {n: float(v) for line in text.splitlines() if line and not line.startswith("#")
            for n, v in [line.rsplit(" ", 1)]}


def compare_run(plan: Path, ckpt: str, load: Load, images, clients: int, work: Path, max_tokens: int) -> dict:
    """The same requests (each completed one once more, in order) through `adaptlink run`."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt, local_files_only=True)
    work.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(work / f"img{i}.png")
    lines = []
    for n, d in enumerate(load.done):
        text, img = d["key"].rsplit("|", 1)
        content = text if img == "None" else [{"type": "image"}, {"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        row = {"id": n, "prompt": prompt, "max_new_tokens": max_tokens}
        if img != "None":
            row["image"] = str(work / f"img{img}.png")
        lines.append(json.dumps(row))
    prompts = work / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    metrics_path = work / "run_metrics.json"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "adaptlink.cli", "run", "--plan", str(plan), "--prompts", str(prompts),
                        "--out", str(work / "out.jsonl"), "--metrics", str(metrics_path),
                        "--in-flight", str(clients), "--log-dir", str(work / "run_logs")],
                       capture_output=True, text=True, cwd=ROOT)
    launch_wall = time.perf_counter() - t0
    m = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    wall = m.get("wall_s") or 0
    return {"returncode": p.returncode, "requests": m.get("requests"), "tokens_per_s": m.get("tokens_per_s"),
            "wall_s": wall, "launch_wall_s": round(launch_wall, 2),
            "cores_busy": {f"rank{r}": round(rep["cpu_s"] / wall, 3) for r, rep in m.get("ranks", {}).items()
                           if "cpu_s" in rep and wall},
            "micro_batch_rows_mean": m.get("batching", {}).get("rows_per_batch_mean")}


def start_server(plan: Path, args, work: Path, n: int) -> tuple[subprocess.Popen, str]:
    """`adaptlink serve` on a free 127.0.0.1 port, ready (its /health 200)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "adaptlink.cli", "serve", "--plan", str(plan), "--port", str(port),
                             "--max-running", str(args.clients), "--max-waiting", str(4 * args.clients),
                             "--log-dir", str(work / f"logs{n}")], env=env, cwd=ROOT, start_new_session=True)
    try:
        wait_ready(base, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, base


def stop_server(proc: subprocess.Popen) -> int | str:
    """SIGTERM (a drain), then the exit status; SIGKILL for the group after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return "killed after 60 s"


def phase(base: str, model: str, images, args, launcher_pid: int) -> tuple[Load, dict]:
    """One clean phase: the load, its summary, the cores each process kept busy, rows per micro-batch."""
    load = Load(base, model, images, args.max_tokens, args.http)
    cpu0 = cpu_seconds(launcher_pid)
    wall = run_loop(load.run(args.clients, args.duration))
    out = summary(load, wall, None)
    out["cores_busy"] = cpu_share(cpu0, cpu_seconds(launcher_pid), wall)
    out["micro_batch_rows_mean"] = _rows_mean(metrics(base))
    return load, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per phase")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kill-at", type=float, help="SIGKILL --kill-rank this many seconds into a second phase")
    ap.add_argument("--kill-rank", type=int, default=2)
    ap.add_argument("--plan", help="a plan.json (default: a tiny LLaVA over 3 CPU devices)")
    ap.add_argument("--compare-run", action="store_true", help="the clean phase's requests through adaptlink run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --compare-run: this many rounds of (a fresh server's clean phase, then "
                         "adaptlink run of its requests), alternating in time; the ratio is their median")
    ap.add_argument("--http", choices=["aiohttp", "httpx"], default="aiohttp",
                    help="the openai client's HTTP transport (default aiohttp)")
    ap.add_argument("--coordinator-device", help="the default plan's coordinator (rank 0) on this torch device, "
                                                 "e.g. cuda:0 (experiments/gpu_check.sh)")
    ap.add_argument("--label", default="serve_load")
    args = ap.parse_args()
    if args.coordinator_device and args.plan:
        raise SystemExit("--coordinator-device: only with the default plan (set torch_device in --plan's instead)")
    if args.duration > 600 or args.clients > 256 or not 1 <= args.rounds <= 10:
        raise SystemExit("bounded: --duration <= 600, --clients <= 256, 1 <= --rounds <= 10")

    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    if args.plan:
        plan = Path(args.plan)
        ckpt = json.loads(plan.read_text())["model"]["source"]
    else:
        from adaptlink.model.tiny import make_tiny
        ckpt = str(make_tiny(work / "tiny"))
        doc = manual_plan(ckpt, chain_shares(ckpt, [2, 2]), backups={1: 2, 2: 1}, in_flight=args.clients)
        if args.coordinator_device:
            doc["devices"][doc["coordinator"]]["torch_device"] = args.coordinator_device
        plan = write_plan(work / "plan.json", doc)
    images = sample_images(3, seed=7)
    report = {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens, "http": args.http,
              "plan": str(plan), "cpus": os.cpu_count(), "machine_note": "a shared machine: other jobs ran too",
              "rounds": []}
    for n in range(args.rounds if args.compare_run else 1):
        proc, base = start_server(plan, args, work, n)
        rnd: dict = {}
        try:
            with urllib.request.urlopen(base + "/v1/models") as r:
                model = json.loads(r.read())["data"][0]["id"]
            clean, rnd["clean"] = phase(base, model, images, args, proc.pid)
            print(json.dumps({"round": n, "clean": rnd["clean"]}, indent=1), flush=True)
            if args.kill_at is not None and n == 0:
                report["killed"] = killed_phase(base, proc, model, images, args, clean)
                print(json.dumps({"killed": report["killed"]}, indent=1), flush=True)
        finally:
            rnd["serve_exit"] = stop_server(proc)
        if args.compare_run:
            rnd["run"] = compare_run(plan, ckpt, clean, images, args.clients, work / f"run{n}", args.max_tokens)
            if rnd["run"].get("tokens_per_s"):
                rnd["serve_over_run_tokens_per_s"] = round(rnd["clean"]["tokens_per_s"] / rnd["run"]["tokens_per_s"], 3)
            print(json.dumps({"round": n, "run": rnd["run"], "ratio": rnd.get("serve_over_run_tokens_per_s")}),
                  flush=True)
        report["rounds"].append(rnd)
    first = report["rounds"][0]
    report["clean"], report["serve_exit"] = first["clean"], first["serve_exit"]
    if "run" in first:
        report["run"] = first["run"]
    ratios = [r["serve_over_run_tokens_per_s"] for r in report["rounds"] if "serve_over_run_tokens_per_s" in r]
    if ratios:
        report["serve_over_run_each"] = ratios
        report["serve_over_run_tokens_per_s"] = round(statistics.median(ratios), 3)
        print(json.dumps({"serve_over_run_each": ratios, "median": report["serve_over_run_tokens_per_s"]}))
    out = ROOT / "experiments" / "results" / "serve_load" / f"{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def killed_phase(base: str, proc, model: str, images, args, clean: Load) -> dict:
    """The load again, --kill-rank SIGKILLed --kill-at seconds in; answers against the clean phase's."""
    killed = {}

    def kill() -> None:
        pid = rank_pid(proc.pid, args.kill_rank)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        killed["at"], killed["pid"] = time.time(), pid

    faulty = Load(base, model, images, args.max_tokens, args.http)
    wall = run_loop(faulty.run(args.clients, args.duration, on_mid=(args.kill_at, kill)))
    return {**summary(faulty, wall, clean.answers), "kill_rank": args.kill_rank, "kill_at_s": args.kill_at,
            "killed_pid": killed.get("pid"), "failovers": metrics(base).get("adaptlink:failovers_total")}


def _rows_mean(m: dict) -> float | None:
    n = m.get("adaptlink:micro_batch_rows_count")
    return round(m["adaptlink:micro_batch_rows_sum"] / n, 3) if n else None


if __name__ == "__main__":
    main()
