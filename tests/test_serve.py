"""`adaptlink serve`: the OpenAI chat API on a 3-rank pipeline (tiny checkpoint, 127.0.0.1).

Driven with the official `openai` client (max_retries=0, so a 429 is seen as one) and raw
HTTP where a client would not send such a request. The oracle is HF `generate` on the
whole model, on the same chat template and image, greedy, one request at a time: the
streamed text, the non-streamed text and the usage counts must equal it.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.client import HTTPConnection
from pathlib import Path

import openai
import pytest
import torch

from adaptlink.model.reference import load_reference
from adaptlink.model.samples import sample_images
from plans import chain_shares, manual_plan, write_plan
from runtime.auth import RunSecret
from runtime.chat import ChatContext, ChatError, parse_chat, text_only
from runtime.launcher import free_port
from runtime.live import Detokenizer
from runtime.requests import Result
from runtime.serving import HttpOptions, HttpServer

SERVE = (sys.executable, "-m", "adaptlink.cli", "serve")
KEY = "sk-test-0123456789"
START_S = 180


class Server:
    def __init__(self, plan: Path, tmp: Path, *extra: str, cmd: tuple = SERVE, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = tmp / "logs"
        (tmp / "key").write_text(KEY + "\n")
        self.proc = subprocess.Popen([*cmd, "--plan", str(plan), "--port", str(self.port), "--log-dir",
                                      str(self.logs), "--api-key-file", str(tmp / "key"), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})})
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            status, _, answer = self.get("/health", key=None)
            if status == 200:
                break
            assert status in (0, 503), (status, answer)  # 0: not listening yet
            assert status == 0 or answer["error"]["type"] == "unavailable_error"
            time.sleep(0.3)
        else:
            self.close()
            pytest.fail(f"the server was not ready within {START_S} s")
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def get(self, path: str, key: str | None = KEY):
        return self.request("GET", path, key=key)

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
                headers: dict | None = None):
        """(status, headers, parsed JSON or text) of one raw HTTP request."""
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, hdrs, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, e.headers, e.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, {}, None
        hdrs = {k.lower(): v for k, v in hdrs.items()}
        try:
            return status, hdrs, json.loads(raw)
        except ValueError:
            return status, hdrs, raw.decode()

    def metrics(self) -> dict[str, float]:
        _, _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def close(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(30)


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def text_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return load_reference(tiny_ckpt)


@pytest.fixture(scope="module")
def images():
    return sample_images(3, seed=7)


def hf_chat(ref, messages: list[dict], image, max_tokens: int) -> tuple[str, int, int]:
    """HF generate on the chat template's prompt: (text, prompt tokens, completion tokens)."""
    model, processor = ref
    hf_messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                    [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
                   for m in messages]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    enc = processor(images=[image] if image is not None else None, text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return processor.tokenizer.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new)


def stream_text(client, usage: bool = True, **kw) -> tuple[str, str, dict | None, list]:
    """(text, finish_reason, usage, chunks) of a streamed completion."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": usage}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, reasons[-1] if reasons else None, chunks[-1].usage, chunks


@pytest.fixture(scope="module")
def plan(tiny_ckpt, tmp_path_factory):
    ckpt = str(tiny_ckpt)
    d = tmp_path_factory.mktemp("serve")
    return write_plan(d / "plan.json", manual_plan(ckpt, chain_shares(ckpt, [2, 2]), backups={1: 2, 2: 1},
                                                   in_flight=4))


@pytest.fixture(scope="module")
def server(plan, tmp_path_factory):
    s = Server(plan, tmp_path_factory.mktemp("srv"), "--max-running", "8", "--max-waiting", "2")
    yield s
    s.close()


def model_name(server) -> str:
    return server.client.models.list().data[0].id


def test_health_and_chat_answer_503_while_loading():
    front = HttpServer(HttpOptions(port=free_port(), model_name="m")).start()  # no engine attached: loading
    try:
        base = f"http://{front.options.host}:{front.options.port}"
        for path, body in (("/health", None), ("/v1/chat/completions", b'{"model": "m", "messages": []}')):
            req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                for _ in range(50):
                    try:
                        urllib.request.urlopen(req, timeout=10)
                    except urllib.error.URLError as u:
                        if isinstance(u, urllib.error.HTTPError):
                            raise
                        time.sleep(0.1)  # uvicorn's thread is still starting
            assert e.value.code == 503
            assert json.loads(e.value.read())["error"] == {"message": "Loading model", "type": "unavailable_error",
                                                           "param": None, "code": "unavailable"}
    finally:
        front.stop()


# ---- the answers -----------------------------------------------------------------------

def test_streamed_and_plain_text_equal_hf_generate_on_the_chat_template(server, ref, images):
    name = model_name(server)
    for messages, image in ((image_message("What is shown here?", images[0]), images[0]),
                            (text_message("Tell me about the sea"), None)):
        want, n_prompt, n_new = hf_chat(ref, messages, image, 12)
        plain = server.client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        assert plain.choices[0].message.content == want
        assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (n_prompt, n_new)
        assert plain.choices[0].finish_reason == ("length" if n_new == 12 else "stop")
        text, reason, usage, chunks = stream_text(server.client, model=name, messages=messages, max_tokens=12,
                                                  temperature=0)
        assert text == want
        assert chunks[0].choices[0].delta.role == "assistant"
        assert reason == plain.choices[0].finish_reason
        assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, n_new)
        assert chunks[-1].choices == []


def test_seeded_sampling_streams_the_same_text_as_plain(server, images):
    name = model_name(server)
    kw = dict(model=name, messages=image_message("Describe it", images[1]), max_tokens=10, temperature=0.9,
              seed=1234)
    plain = server.client.chat.completions.create(**kw).choices[0].message.content
    assert stream_text(server.client, **kw)[0] == plain


def test_concurrent_streams_share_micro_batches_and_each_equals_hf(server, ref, images):
    name = model_name(server)
    before = server.metrics()
    # 8 requests over the 4 micro-batches a 3-stage pipeline keeps in flight: 2 rows each
    jobs = [(image_message(f"Picture {i}: what colour?", images[i]), images[i]) for i in range(3)] + \
           [(text_message(f"Once upon a time {i}"), None) for i in range(5)]
    got = [None] * len(jobs)

    def one(i):
        got[i] = stream_text(server.client, model=name, messages=jobs[i][0], max_tokens=16, temperature=0)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (messages, image), text in zip(jobs, got):
        assert text == hf_chat(ref, messages, image, 16)[0]
    after = server.metrics()
    sent = after["adaptlink:micro_batch_rows_count"] - before["adaptlink:micro_batch_rows_count"]
    alone = after['adaptlink:micro_batch_rows_bucket{le="1.0"}'] - before['adaptlink:micro_batch_rows_bucket{le="1.0"}']
    assert alone < sent, "no micro-batch held more than one request"
    m = _wait_metrics(server, lambda m: all(m.get(f'adaptlink:busy_seconds_total{{rank="{r}"}}', 0) > 0
                                            for r in range(3)))
    assert all(m.get(f'adaptlink:busy_seconds_total{{rank="{r}"}}', 0) > 0 for r in range(3)), "a rank never busy"


# ---- the API around it -----------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL reads the size before any decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_each_malformed_request_gets_its_4xx_while_a_stream_completes(server, ref, images):
    name = model_name(server)
    want = hf_chat(ref, text_message("Keep talking"), None, 60)[0]
    result = {}
    t = threading.Thread(target=lambda: result.update(text=stream_text(
        server.client, model=name, messages=text_message("Keep talking"), max_tokens=60, temperature=0)[0]))
    t.start()

    def chat(body) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, answer = server.request("POST", "/v1/chat/completions", raw)
        return status, answer

    def with_image(url):
        return {"model": name, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}

    ok = {"model": name, "messages": text_message("hi")}
    huge = "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()
    cases = {
        "bad JSON": (b'{"model": ', 400),
        "messages not a list": ({"model": name, "messages": "hi"}, 400),
        "content of a wrong type": ({"model": name, "messages": [{"role": "user", "content": 3}]}, 400),
        "max_tokens a string": ({**ok, "max_tokens": "8"}, 400),
        "temperature out of range": ({**ok, "temperature": -1}, 400),
        "unknown model": ({**ok, "model": "gpt-4"}, 404),
        "bad base64": (with_image("data:image/png;base64,@@@notbase64"), 400),
        "not an image": (with_image("data:image/png;base64," + base64.b64encode(b"hello world").decode()), 400),
        "over the pixel limit": (with_image(huge), 400),
        "n > 1": ({**ok, "n": 2}, 400),
        "a local path": (with_image("/etc/passwd"), 400),
        "a file URL": (with_image("file:///etc/passwd"), 400),
        "a remote URL": (with_image("http://127.0.0.1:1/x.png"), 400),
        "two images": ({"model": name, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(images[0])}},
            {"type": "image_url", "image_url": {"url": data_url(images[1])}}]}]}, 400),
        "past the context": ({**ok, "max_tokens": 10**6}, 400),
    }
    for what, (body, status) in cases.items():
        got, answer = chat(body)
        assert got == status, (what, answer)
        assert set(answer["error"]) >= {"message", "type", "code"}, what
    status, _, answer = server.request("POST", "/v1/chat/completions", b"",
                                       headers={"Content-Length": str(64 * 2**20)})
    assert status == 413 and "error" in answer
    assert server.get("/v1/nowhere")[0] == 404
    t.join(120)
    assert result["text"] == want


def test_api_key_is_required_everywhere_but_health(server):
    for key in (None, "sk-wrong"):
        for path in ("/v1/models", "/metrics"):
            status, _, answer = server.get(path, key=key)
            assert status == 401 and answer["error"]["type"] == "authentication_error"
        status, _, _ = server.request("POST", "/v1/chat/completions", b"{}", key=key)
        assert status == 401
    assert server.get("/health", key=None) == (200, server.get("/health", key=None)[1], {"status": "ok"})
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_overload_answers_429_with_retry_after_and_the_admitted_complete(server, ref):
    name = model_name(server)
    statuses, texts = [], []
    lock = threading.Lock()

    def one(i):
        body = json.dumps({"model": name, "messages": text_message(f"Count {i}"), "max_tokens": 40,
                           "temperature": 0}).encode()
        status, headers, answer = server.request("POST", "/v1/chat/completions", body)
        with lock:
            statuses.append((status, headers.get("retry-after")))
            if status == 200:
                texts.append((i, answer["choices"][0]["message"]["content"]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [s for s in statuses if s[0] == 429]
    assert refused and all(r == "1" for _, r in refused)
    assert len(texts) >= 8 and len(refused) + len(texts) == 20, statuses
    for i, text in texts:
        assert text == hf_chat(ref, text_message(f"Count {i}"), None, 40)[0]
    assert server.metrics()['adaptlink:rejections_total{reason="queue_full"}'] >= len(refused)


def _wait_metrics(server, ok, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if ok(m):
            return m
        time.sleep(0.1)
    return m


def test_a_disconnected_stream_is_cancelled_and_its_kv_freed(server):
    name = model_name(server)
    before = server.metrics().get('adaptlink:cancellations_total{reason="cancelled"}', 0)
    stream = server.client.chat.completions.create(model=name, messages=text_message("Go on and on"),
                                                   max_tokens=480, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    held = [f'adaptlink:kv_bytes{{rank="{r}"}}' for r in (1, 2)]  # the workers' own KV stores
    m = _wait_metrics(server, lambda m: all(m.get(k, 0) > 0 for k in held), timeout=10)
    assert all(m.get(k, 0) > 0 for k in held), "no KV on the workers while running"
    assert any(v > 0 for k, v in m.items() if k.startswith("adaptlink:kv_reserved_bytes"))
    stream.close()  # the client goes away mid-stream

    def freed(m):
        return (m["adaptlink:num_requests_running"] == 0 and all(m.get(k, 1) == 0 for k in held)
                and m.get('adaptlink:cancellations_total{reason="cancelled"}', 0) > before)

    m = _wait_metrics(server, freed)
    assert m["adaptlink:num_requests_running"] == 0
    assert m['adaptlink:cancellations_total{reason="cancelled"}'] == before + 1
    assert all(v == 0 for k, v in m.items() if k.startswith(("adaptlink:kv_reserved_bytes", "adaptlink:kv_bytes")))


def test_a_client_gone_before_its_plain_answer_is_cancelled_and_its_kv_freed(server):
    """A non-streamed request whose client goes away while its tokens are being made (the
    handler checks every DISCONNECT_POLL_S, tokens or not)."""
    name = model_name(server)
    before = server.metrics().get('adaptlink:cancellations_total{reason="cancelled"}', 0)
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": name, "messages": text_message("Go on and on"), "max_tokens": 480, "temperature": 0}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    held = [f'adaptlink:kv_bytes{{rank="{r}"}}' for r in (1, 2)]
    m = _wait_metrics(server, lambda m: all(m.get(k, 0) > 0 for k in held), timeout=10)
    assert all(m.get(k, 0) > 0 for k in held), "no KV on the workers while running"
    conn.close()  # gone before the answer

    def freed(m):
        return (m["adaptlink:num_requests_running"] == 0 and all(m.get(k, 1) == 0 for k in held)
                and m.get('adaptlink:cancellations_total{reason="cancelled"}', 0) > before)

    m = _wait_metrics(server, freed)
    assert m['adaptlink:cancellations_total{reason="cancelled"}'] == before + 1
    assert all(v == 0 for k, v in m.items() if k.startswith(("adaptlink:kv_reserved_bytes", "adaptlink:kv_bytes")))


def test_cancel_endpoint_ends_a_stream_the_client_keeps(server):
    name = model_name(server)
    stream = server.client.chat.completions.create(model=name, messages=text_message("Go on"), max_tokens=400,
                                                   temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    status, _, answer = server.request("POST", f"/v1/cancel/{first.id}")
    assert status == 200 and answer["cancelled"]
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "cancelled"
    assert len(rest) < 400
    assert server.request("POST", "/v1/cancel/chatcmpl-nope")[0] == 404


def test_stop_strings_end_the_text_before_them(server, ref):
    name = model_name(server)
    full = hf_chat(ref, text_message("Tell me about the sea"), None, 20)[0]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assume = full.find(stop)
    for stream in (False, True):
        if stream:
            text, reason, _, _ = stream_text(server.client, model=name, messages=text_message("Tell me about the sea"),
                                             max_tokens=20, temperature=0, stop=[stop])
        else:
            c = server.client.chat.completions.create(model=name, messages=text_message("Tell me about the sea"),
                                                      max_tokens=20, temperature=0, stop=stop)
            text, reason = c.choices[0].message.content, c.choices[0].finish_reason
        assert (text, reason) == (full[:assume], "stop")


# ---- a device lost while streaming; drain ----------------------------------------------

def test_a_rank_sigkilled_mid_stream_leaves_every_stream_complete_and_identical_and_sigterm_drains(plan, ref, images, tmp_path):
    s = Server(plan, tmp_path, "--inject", "kill:rank=2,after_tokens=30", "--metrics", str(tmp_path / "m.json"))
    try:
        name = model_name(s)
        jobs = [(image_message("What is it?", images[0]), images[0]), (text_message("Once upon a time"), None),
                (text_message("Tell me about the sea"), None)]
        got = [None] * len(jobs)
        health = []

        def one(i):
            got[i] = stream_text(s.client, model=name, messages=jobs[i][0], max_tokens=40, temperature=0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            health.append(s.get("/health", key=None)[0])
            time.sleep(0.05)
        for (messages, image), (text, reason, usage, _) in zip(jobs, got):
            want, _, n = hf_chat(ref, messages, image, 40)
            assert text == want and usage.completion_tokens == n
        assert s.metrics()["adaptlink:failovers_total"] == 1
        assert set(health) == {200}
        # SIGTERM with a stream open: it is finished (not cut), new requests are refused, exit 0
        want = hf_chat(ref, text_message("Go on and on"), None, 80)[0]
        stream = s.client.chat.completions.create(model=name, messages=text_message("Go on and on"),
                                                  max_tokens=80, temperature=0, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].delta.content or ""
        s.proc.send_signal(signal.SIGTERM)  # the launcher forwards it to the coordinator: a drain
        text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        status, _, answer = s.request("POST", "/v1/chat/completions",
                                      json.dumps({"model": name, "messages": text_message("hi")}).encode())
        assert status in (0, 503), answer  # 503 while draining, 0 once it has stopped listening
        assert s.proc.wait(60) == 0
        m = json.loads((tmp_path / "m.json").read_text())  # --metrics: what was served, the failover
        assert (m["requests"], m["completed"], m["failed"], len(m["failovers"])) == (4, 4, 0, 1)
        assert m["tokens_per_s"] > 0
    finally:
        s.close()


def test_the_coordinators_rank_serves_under_torchrun(plan, ref, images, tmp_path):
    """Several machines' form (here one torchrun agent with 3 ranks): `-m adaptlink.launch
    --serve` on the coordinator's rank answers the API with HF's text."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                "-m", "adaptlink.launch")
    s = Server(plan, tmp_path, "--serve", cmd=torchrun, env={"OMP_NUM_THREADS": "1", **RunSecret.generate().env()})
    try:
        messages = image_message("What is shown here?", images[1])
        text, reason, usage, _ = stream_text(s.client, model=model_name(s), messages=messages, max_tokens=12,
                                             temperature=0)
        want, prompt_tokens, n = hf_chat(ref, messages, images[1], 12)
        assert (text, usage.prompt_tokens, usage.completion_tokens) == (want, prompt_tokens, n)
    finally:
        s.close()


def test_the_coordinators_death_ends_every_stream_with_an_error_not_a_hang(plan, tmp_path):
    s = Server(plan, tmp_path, "--inject", "kill:rank=0,after_tokens=20")
    try:
        name = model_name(s)
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            stream_text(s.client, model=name, messages=text_message("Go on and on"), max_tokens=400, temperature=0)
        assert not isinstance(e.value, AssertionError)
        assert time.monotonic() - t0 < 60
        assert s.proc.wait(60) != 0
    finally:
        s.close()


# ---- image URLs: --allow-remote-images and --media-dir (parse_chat in this process) ----

class _Images(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(3)
        if self.path in ("/img.png", "/slow"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def chat_ctx(tiny_ckpt):
    from transformers import AutoProcessor

    return ChatContext(AutoProcessor.from_pretrained(tiny_ckpt, local_files_only=True), "m", 512, 8)


def _body(url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


def _refused(ctx, url: str) -> str:
    with pytest.raises(ChatError) as e:
        parse_chat(_body(url), ctx)
    assert e.value.status == 400
    return e.value.message


def test_remote_images_only_with_the_flag_within_timeout_and_size(chat_ctx, images):
    buf = io.BytesIO()
    images[0].save(buf, "PNG")
    _Images.png = buf.getvalue()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert "--allow-remote-images" in _refused(chat_ctx, base + "/img.png")
        remote = dataclasses.replace(chat_ctx, remote_images=True, remote_timeout_s=0.5)
        got = parse_chat(_body(base + "/img.png"), remote).request
        want = parse_chat(_body(data_url(images[0])), chat_ctx).request
        assert torch.equal(got.pixel_values, want.pixel_values) and torch.equal(got.input_ids, want.input_ids)
        assert "limit" in _refused(dataclasses.replace(remote, max_remote_bytes=100), base + "/img.png")
        t0 = time.monotonic()
        assert "could not be fetched" in _refused(remote, base + "/slow")
        assert time.monotonic() - t0 < 2.5
        assert "HTTP 404" in _refused(remote, base + "/nothing.png")
    finally:
        srv.shutdown()


def test_file_urls_only_under_the_media_dir(chat_ctx, images, tmp_path):
    media, outside = tmp_path / "media", tmp_path / "outside.png"
    media.mkdir()
    images[0].save(media / "a.png")
    images[0].save(outside)
    (media / "escape.png").symlink_to(outside)
    os.mkfifo(media / "fifo.png")
    assert "--media-dir" in _refused(chat_ctx, f"file://{media / 'a.png'}")
    ctx = dataclasses.replace(chat_ctx, media_dir=str(media))
    got = parse_chat(_body(f"file://{media / 'a.png'}"), ctx).request
    want = parse_chat(_body(data_url(images[0])), chat_ctx).request
    assert torch.equal(got.pixel_values, want.pixel_values)
    assert "not under" in _refused(ctx, f"file://{outside}")
    assert "not under" in _refused(ctx, f"file://{media / 'escape.png'}")
    assert "not under" in _refused(ctx, f"file://{media}/../outside.png")
    assert "not a regular file" in _refused(ctx, f"file://{media / 'fifo.png'}")
    assert "a local path is not read" in _refused(ctx, str(media / "a.png"))


# ---- text deltas ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["plain words and more words", "caf\u00e9 \u00fcber na\u00efve", "snow \u2603 and \U0001f600 faces"])
def test_deltas_join_into_the_whole_decode_and_never_split_a_character(chat_ctx, text):
    tok = chat_ctx.processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    deltas = [d.add(t) for t in ids] + [d.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in x for x in deltas)


def test_windowed_deltas_equal_the_whole_decode_on_random_tokens(chat_ctx):
    """The detokenizer's window (a few tokens decoded per token) gives the text of the whole
    decode, cut before the first stop string, on random token sequences (byte-level pieces
    that split characters included)."""
    tok = chat_ctx.processor.tokenizer
    rng = random.Random(5)
    for trial in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        full = tok.decode(ids, skip_special_tokens=True)
        stop = []
        if trial % 2 and len(full) > 4:
            i = rng.randrange(len(full) - 2)
            stop = [full[i:i + rng.randint(1, 3)]]
        d = Detokenizer(tok, stop)
        deltas = [d.add(t) for t in ids] + [d.finish()]
        want = full[:full.find(stop[0])] if stop and stop[0] in full else full
        assert "".join(deltas) == want, (ids, stop)
        assert d.stopped == bool(stop and stop[0] in full)


def test_a_stop_string_split_over_tokens_ends_the_text_before_it_and_is_never_sent(chat_ctx):
    tok = chat_ctx.processor.tokenizer
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for stop in ("fox jumps", "x j", "lazy", "the q"):
        d = Detokenizer(tok, [stop, "never there"])
        sent = ""
        for t in ids:
            sent += d.add(t)
            if d.stopped:
                break
        sent += d.finish()
        assert d.stopped and sent == text[:text.find(stop)], stop


# ---- the wire format, against a stand-in engine -----------------------------------------

class _SlowEngine:
    """A coordinator stand-in: each request's tokens come after a silence of `quiet_s`."""

    def __init__(self, live, tokens: list[int], quiet_s: float):
        self.live, self.tokens, self.quiet_s = live, tokens, quiet_s
        self.fatal, self.active, self.in_flight, self.kv, self.failovers = None, {}, 4, None, []
        self.ex = type("Ex", (), {"rank": 0, "busy_s": 0.0})()

    def submit_threadsafe(self, req):
        def run():
            time.sleep(self.quiet_s)
            for t in self.tokens:
                self.live.on_token(req.index, t)
            self.live.on_result(Result(req.id, tokens=list(self.tokens), line=req.line))
            self.live.flush()  # the coordinator's on_turn: the turn's items go to the server's loop
        threading.Thread(target=run, daemon=True).start()

    def cancel(self, index, reason="cancelled"):
        pass

    def drain(self):
        pass


def test_sse_events_are_openais_with_keep_alive_comments_in_a_silence(chat_ctx):
    front = HttpServer(HttpOptions(port=free_port(), model_name="m", keepalive_s=0.2)).start()
    tok = chat_ctx.processor.tokenizer
    ids = tok("hello there", add_special_tokens=False)["input_ids"]
    front.engine.attach(_SlowEngine(front.engine, ids, quiet_s=0.9), chat_ctx)
    try:
        conn = HTTPConnection(front.options.host, front.options.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": "m", "messages": text_message("hi"), "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    finally:
        front.stop()
    keep = [i for i, e in enumerate(events) if e == ": keep-alive"]
    data = [json.loads(e[len("data: "):]) for e in events[:-1] if e.startswith("data: ")]
    assert len(keep) >= 3 and keep[0] == 1  # after the role chunk, during the silence
    assert all(e.startswith("data: ") or e == ": keep-alive" for e in events) and events[-1] == "data: [DONE]"
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data if d["choices"]) == \
        tok.decode(ids, skip_special_tokens=True)
    assert data[-2]["choices"][0]["finish_reason"] == "length" and data[-1]["choices"] == []
    assert data[-1]["usage"]["completion_tokens"] == len(ids)
    assert {d["object"] for d in data} == {"chat.completion.chunk"} and len({d["id"] for d in data}) == 1


def test_only_text_only_chat_bodies_count_as_text_only():
    """The server parses these on its loop; anything else (an image, a body parse_chat would
    refuse) goes to a worker thread, where parse_chat gives its error."""
    text = {"role": "user", "content": "hi"}
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    assert text_only({"messages": [text, parts]})
    assert not text_only({"messages": [text, image]})
    for bad in ([], "x", {}, {"messages": 3}, {"messages": ["x"]}, {"messages": [{"content": ["x"]}]}):
        assert not text_only(bad), bad
