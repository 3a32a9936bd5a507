"""The HTTP side's own cost: CPU seconds per token of `adaptlink serve`'s front end alone.

`runtime.serving.HttpServer` (uvicorn + the FastAPI app, in this process) in front of a
stand-in coordinator: a thread that gives every admitted request its next token every
`--step-ms` (the tokens of a fixed text), calling `LiveEngine.on_token` / `on_result` and
one `flush()` per step as `Coordinator.run` does. N `openai` async clients run in a child
process (their CPU over the load is reported apart, `clients_cpu_us_per_token`), each
sending one request after another (serve_load's mix: every 3rd with an image, every 2nd
streamed, max_tokens 32; `--http` picks the client's transport). The figure is this
process's CPU seconds (time.process_time: the server's thread, its worker threads for
parse_chat, the stand-in) over the tokens delivered: what the front end adds to the
coordinator's process per token, without the model.

    python experiments/serve_overhead.py [--clients 16] [--seconds 10] [--text-only]

Bounded: --seconds of load, everything on 127.0.0.1. Writes
experiments/results/serve_overhead.json (serve_overhead_text.json with --text-only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

TEXT = "the quick brown fox jumps over the lazy dog and runs far away into the green forest where it sleeps"


class StandInCoordinator:
    """What LiveEngine needs of a Coordinator; a token per running request per step."""

    def __init__(self, live, tokens: list[int], step_s: float):
        self.live, self.tokens, self.step_s = live, tokens, step_s
        self.fatal, self.active, self.in_flight, self.kv, self.failovers, self.dead = None, {}, 1024, None, [], set()
        self.ex = type("Executor", (), {"rank": 0, "busy_s": 0.0, "kv_bytes": lambda self: 0})()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.delivered = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name="stand-in", daemon=True).start()

    def submit_threadsafe(self, req) -> None:
        self.inbox.put(("submit", req))

    def cancel(self, index: int, reason: str = "cancelled") -> None:
        self.inbox.put(("cancel", index))

    def drain(self) -> None:
        pass

    def _run(self) -> None:
        from runtime.requests import Result

        running: dict[int, list] = {}
        while not self.stopped.is_set():
            while True:
                try:
                    what, arg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if what == "submit":
                    running[arg.index] = [arg, 0]
                else:
                    running.pop(arg, None)
            self.active = dict(running)
            for index, (req, n) in list(running.items()):
                self.live.on_token(index, self.tokens[n])
                self.delivered += 1
                running[index][1] = n + 1
                if n + 1 == len(self.tokens):
                    self.live.on_result(Result(req.id, tokens=list(self.tokens), line=req.line))
                    del running[index]
            self.live.flush()
            time.sleep(self.step_s)


def serve(args) -> dict:
    from transformers import AutoProcessor

    from adaptlink.model.tiny import make_tiny
    from runtime.chat import ChatContext
    from runtime.launcher import free_port
    from runtime.serving import HttpOptions, HttpServer

    ckpt = make_tiny(Path(tempfile.mkdtemp(prefix="serve_overhead_")) / "tiny")
    processor = AutoProcessor.from_pretrained(ckpt, local_files_only=True)
    tokens = (processor.tokenizer(TEXT, add_special_tokens=False)["input_ids"] * 4)[:32]
    front = HttpServer(HttpOptions(port=free_port(), model_name="m")).start()
    coord = StandInCoordinator(front.engine, tokens, args.step_ms / 1000)
    front.engine.attach(coord, ChatContext(processor, "m", 4096, 32))
    time.sleep(0.5)
    cpu0, n0, t0 = time.process_time(), coord.delivered, time.perf_counter()
    client = subprocess.run([sys.executable, __file__, "--client", str(front.options.port), "--clients",
                             str(args.clients), "--seconds", str(args.seconds), "--http", args.http]
                            + (["--text-only"] if args.text_only else []),
                            capture_output=True, text=True, timeout=args.seconds + 120)
    cpu, n, wall = time.process_time() - cpu0, coord.delivered - n0, time.perf_counter() - t0
    coord.stopped.set()
    front.stop(2)
    if client.returncode != 0:
        raise SystemExit(f"the clients failed:\n{client.stderr[-2000:]}")
    done = json.loads(client.stdout.strip().splitlines()[-1])
    done_requests = {k: v for k, v in done.items() if k != "cpu_s"}
    return {"clients": args.clients, "seconds": args.seconds, "step_ms": args.step_ms,
            "mix": "text only" if args.text_only else "every 3rd with an image, every 2nd streamed",
            "requests": done_requests, "tokens": n, "server_cpu_s": round(cpu, 3), "wall_s": round(wall, 2),
            "server_cpu_us_per_token": round(1e6 * cpu / max(1, n), 1), "http": args.http,
            "clients_cpu_s": done["cpu_s"], "clients_cpu_us_per_token": round(1e6 * done["cpu_s"] / max(1, n), 1)}


def clients(port: int, n: int, seconds: float, text_only: bool, http: str) -> None:
    import openai
    from serve_load import data_url, job, make_client, run_loop

    from adaptlink.model.samples import sample_images

    urls = [data_url(im) for im in sample_images(3, seed=7)]
    done = {"streamed": 0, "plain": 0, "errors": 0}

    async def main() -> None:
        c = make_client(f"http://127.0.0.1:{port}", http, timeout=60)
        until = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            k = i
            while time.perf_counter() < until:
                _, messages, _, stream = job(k, urls)
                if text_only:
                    messages = [{"role": "user", "content": "Tell me about the sea"}]
                try:
                    if stream:
                        async for _ in await c.chat.completions.create(model="m", messages=messages, max_tokens=32,
                                                                       temperature=0, stream=True):
                            pass
                    else:
                        await c.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
                    done["streamed" if stream else "plain"] += 1
                except openai.OpenAIError:
                    done["errors"] += 1
                k += n

        cpu0 = time.process_time()
        await asyncio.gather(*[loop(i) for i in range(n)])
        done["cpu_s"] = round(time.process_time() - cpu0, 3)  # the load's, not the start-up's

    run_loop(main())
    print(json.dumps(done))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--step-ms", type=float, default=20.0, help="the stand-in's time per decode step")
    ap.add_argument("--text-only", action="store_true", help="no images (no image decoding in parse_chat)")
    ap.add_argument("--http", choices=["aiohttp", "httpx"], default="aiohttp", help="the clients' HTTP transport")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the child process: clients of this port
    args = ap.parse_args()
    if args.seconds > 120 or args.clients > 128:
        raise SystemExit("bounded: --seconds <= 120, --clients <= 128")
    if args.client is not None:
        return clients(args.client, args.clients, args.seconds, args.text_only, args.http)
    report = serve(args)
    out = ROOT / "experiments" / "results" / f"serve_overhead{'_text' if args.text_only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
