"""`adaptlink demo`: the whole product on one machine, from nothing, in a few minutes.

1. build a small random-weight LLaVA checkpoint and sample requests (offline);
2. profile an EMULATED 4-device cluster on this machine (compute slowdowns 2/3/5/8x,
   1 Gbit/s links: the runtime enforces them);
3. plan it with the ILP and with the uniform baseline;
4. run both plans for real (one process per device, pipelined) and compare tokens/s,
   checking both produce the tokens of HuggingFace `generate` on the whole model;
5. run the ILP plan again and SIGKILL one device mid-run: its backup takes over;
6. serve the ILP plan (`adaptlink serve`) and stream a chat completion about an image
   through the official `openai` client, checked against HF `generate` on the chat template.

Every step prints the `adaptlink` command it runs, so each can be re-run by hand.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adaptlink.runs import cli, make_plan, profile_local, run_plan
from partitioner.errors import AdaptLinkError

DEMO_MODEL = dict(text_hidden=512, text_layers=8, text_intermediate=1536, text_heads=8, text_kv_heads=2)
SLOWDOWNS = [2, 3, 5, 8]
REQUESTS, NEW_TOKENS, IN_FLIGHT = 8, 16, 8
PREFILL = 48  # prompt tokens of the sample requests, image tokens included (about)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build, profile, plan, run and fail over on an emulated 4-device cluster")
    p.add_argument("--workdir", type=Path, default=Path("adaptlink-demo"),
                   help="where the checkpoint, cluster.json, plans and outputs go (default %(default)s)")
    p.add_argument("--no-failover", action="store_true", help="skip the dropout act")
    p.add_argument("--no-serve", action="store_true", help="skip the last act: a streamed chat completion")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    # torch and transformers (~1.9 s to import) load only when the demo runs, so that
    # `adaptlink --help` and the other commands start fast
    from adaptlink.model.reference import hf_reference
    from adaptlink.model.samples import write_sample_requests
    from adaptlink.model.tiny import make_tiny

    con = Console()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def act(title: str) -> None:
        con.rule(f"[bold]{title}[/]  [dim]({time.perf_counter() - t_start:.0f} s)[/]")

    act("1. a small LLaVA checkpoint (random weights, built offline) and 8 requests")
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_tiny(ckpt, **DEMO_MODEL)
    prompts = write_sample_requests(work / "requests", n=REQUESTS, max_new_tokens=NEW_TOKENS)
    cli("graph", "--model", str(ckpt), console=con)

    act("2. profile 4 devices: EMULATED compute slowdowns 2/3/5/8x and 1 Gbit/s links on this machine")
    cluster = work / "cluster.json"
    profile_local(ckpt, cluster, slowdowns=SLOWDOWNS, prefill_tokens=PREFILL, decode_tokens=NEW_TOKENS,
                  console=con)

    act("3. plan: the ILP against the uniform split")
    plans = {}
    for method in ("ilp", "uniform"):
        plans[method] = work / f"plan-{method}.json"
        make_plan(ckpt, cluster, plans[method], method=method, prefill_tokens=PREFILL,
                  decode_tokens=NEW_TOKENS, in_flight=IN_FLIGHT, console=con)

    act("4. run both plans: 4 processes each, requests pipelined, tokens checked against HF generate")
    con.print("[dim]reference: LlavaForConditionalGeneration.generate on the whole model ...[/]")
    reference = hf_reference(ckpt, prompts)
    ids = [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    runs = {}
    for method, plan in plans.items():
        con.print(f"[cyan]$ adaptlink run --plan {plan} --prompts {prompts} --out {work / method / 'out.jsonl'}[/]")
        runs[method] = r = run_plan(plan, prompts, work / method)
        same = [r.tokens.get(i) for i in ids] == reference
        con.print(f"  {method}: {r.metrics['completed']}/{r.metrics['requests']} requests, "
                  f"{r.metrics['tokens_per_s']:.1f} tok/s measured, "
                  f"{json.loads(plan.read_text())['predicted'].get('tokens_per_s') or 0:.1f} predicted; "
                  f"tokens {'[green]identical to HF generate[/]' if same else '[red]DIFFER from HF generate[/]'}")
        if not same:
            raise AdaptLinkError(f"{method}: the pipelined tokens differ from HF generate (see {work / method})")
    speedup = runs["ilp"].metrics["tokens_per_s"] / runs["uniform"].metrics["tokens_per_s"]
    # the same ILP plan without micro-batches: one request per forward on every stage
    con.print(f"[cyan]$ adaptlink run --plan {plans['ilp']} --prompts {prompts} --max-batch-rows 1 ...[/]")
    r = runs["ilp, one row per forward"] = run_plan(plans["ilp"], prompts, work / "ilp-rows1",
                                                     max_batch_rows=1)
    if [r.tokens.get(i) for i in ids] != reference:
        raise AdaptLinkError(f"ilp without micro-batches: the tokens differ from HF generate (see {work / 'ilp-rows1'})")
    b = runs["ilp"].metrics["batching"]
    batching = runs["ilp"].metrics["tokens_per_s"] / r.metrics["tokens_per_s"]
    con.print(f"  micro-batches of {b['rows_per_batch_mean']:.1f} rows on average ran {batching:.2f}x the "
              f"tokens/s of one request per forward; tokens [green]identical to HF generate[/]")

    t = Table(title="measured on this machine (EMULATED heterogeneity)")
    for c in ("plan", "tokens/s", "requests/s", "wall s", "vs uniform"):
        t.add_column(c, justify="left" if c == "plan" else "right")
    for method, r in runs.items():
        m = r.metrics
        t.add_row(method, f"{m['tokens_per_s']:.1f}", f"{m['requests_per_s']:.2f}", f"{m['wall_s']:.1f}",
                  f"{m['tokens_per_s'] / runs['uniform'].metrics['tokens_per_s']:.2f}x")
    con.print(t)

    if not args.no_failover:
        act("5. dropout: SIGKILL a device mid-run; its preloaded backup takes over")
        plan = json.loads(plans["ilp"].read_text())
        victims = [d["rank"] for d in plan["devices"] if d["rank"] != plan["coordinator"] and d["blocks"]
                   and any(b["for_rank"] == d["rank"] for h in plan["devices"] for b in h["backups"])]
        if not victims:
            con.print("[yellow]the plan has no device with a backup to kill; skipping[/]")
        else:
            victim = victims[-1]
            spec = f"kill:rank={victim},after_tokens={REQUESTS * NEW_TOKENS // 3}"
            con.print(f"[cyan]$ adaptlink run --plan {plans['ilp']} --prompts {prompts} --inject {spec} ...[/]")
            r = run_plan(plans["ilp"], prompts, work / "failover", inject=[spec])
            f = r.failover
            same = [r.tokens.get(i) for i in ids] == reference
            con.print(f"  rank {victim} ({plan['devices'][victim]['name']}) killed; detected after "
                      f"{f.detection_s * 1e3:.0f} ms, next token {f.recovery_s * 1e3:.0f} ms after the kill; "
                      f"{f.replayed} requests replayed; {r.metrics['completed']}/{r.metrics['requests']} finished, "
                      f"tokens {'[green]identical to HF generate[/]' if same else '[red]DIFFER[/]'}")
            if not same or r.metrics["completed"] != r.metrics["requests"]:
                raise AdaptLinkError(f"failover lost or changed requests (see {work / 'failover'})")

    if not args.no_serve:
        act("6. serve: `adaptlink serve` and a streamed chat completion through the openai client")
        _serve_act(con, plans["ilp"], ckpt, work)

    act(f"done: the ILP plan ran {speedup:.2f}x the uniform split's tokens/s; micro-batches {batching:.2f}x "
        f"one request per forward")
    con.print(f"everything is in {work}; `adaptlink show {plans['ilp']} --out plan.png` draws the placement")
    return 0


def _serve_act(con: Console, plan: Path, ckpt: Path, work: Path) -> None:
    """Serve `plan`, stream one chat completion about an image, check it against HF generate."""
    import openai
    import torch

    from adaptlink.model.reference import load_reference
    from adaptlink.model.samples import sample_images
    from runtime.launcher import free_port

    port = free_port()
    con.print(f"[cyan]$ adaptlink serve --plan {plan} --port {port}[/]")
    proc = subprocess.Popen([sys.executable, "-m", "adaptlink.cli", "serve", "--plan", str(plan), "--port", str(port),
                             "--log-dir", str(work / "serve-logs")], start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AdaptLinkError(f"adaptlink serve did not start (logs in {work / 'serve-logs'})")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.3)
        image = sample_images(1, seed=11)[0]
        buf = io.BytesIO()
        image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = "What is in this picture?"
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        model = client.models.list().data[0].id
        con.print("[cyan]" + escape(f"openai.OpenAI(base_url='{base}/v1').chat.completions.create("
                                    f"model={model!r}, stream=True, messages=[user: image + {question!r}])") + "[/]")
        t0, text, first = time.perf_counter(), "", None
        for chunk in client.chat.completions.create(
                model=model, stream=True, temperature=0, max_tokens=24,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": question}]}]):
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first or time.perf_counter() - t0
                text += delta
                con.print(delta, end="", markup=False, highlight=False)
        con.print()
        ref_model, processor = load_reference(ckpt)
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": question}]}], add_generation_prompt=True, tokenize=False)
        enc = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = ref_model.generate(**enc, do_sample=False, max_new_tokens=24)
        want = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        same = text == want
        con.print(f"  first token after {first * 1e3:.0f} ms; the streamed text is "
                  f"{'[green]identical to HF generate[/]' if same else '[red]DIFFERENT from HF generate[/]'} "
                  f"on the same chat template and image (random weights: the words mean nothing)")
        if not same:
            raise AdaptLinkError("the served text differs from HF generate")
    finally:
        proc.send_signal(signal.SIGTERM)  # a drain: exit 0
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "killed"
    con.print(f"  SIGTERM: the server drained and exited {rc}")
