"""An OpenAI chat-completions body -> a Request the coordinator runs (docs/SERVING.md).

`parse_chat(body, ctx)` checks every field a client may send and refuses a bad one with a
`ChatError` (an HTTP status, and the OpenAI error shape: message, type, param, code), so
that a malformed request fails alone, before it touches the engine:

- `messages`: a non-empty list of `{role, content}`; role system, user or assistant;
  content a string or a list of parts `{"type": "text", "text"}` and
  `{"type": "image_url", "image_url": {"url"}}`. At most one image per request (the
  coordinator keeps one image span per request).
- Images: a `data:image/...;base64,...` URL; an `http(s)://` URL only with
  --allow-remote-images (fetched with a `REMOTE_TIMEOUT_S` timeout and read up to
  `MAX_REMOTE_BYTES`, no more; note that the server then fetches any address a client
  names); a `file://` URL only with --media-dir, for a regular file whose real path
  (symlinks resolved) lies under that directory. Anything else (a bare path, another
  scheme) is refused with 400 saying why. The base64 is decoded strictly; the pixel count
  is read from the header and refused over `MAX_IMAGE_PIXELS` before decoding; what PIL
  cannot decode is refused with PIL's message.
- The prompt is the processor's chat template (`apply_chat_template`, generation prompt
  added); a processor without one gets `DEFAULT_CHAT_TEMPLATE` (LLaVA-1.5's plain form:
  `USER: <image>\\n{text} ASSISTANT:`).
- `max_tokens` / `max_completion_tokens` (default: the server's --max-new-tokens, cut to
  what the context leaves), `temperature` (OpenAI's default 1; 0 is greedy), `top_p`,
  `seed`, `stop` (a string or up to 4), `n` (1 only), `stream`,
  `stream_options.include_usage`; the prompt plus max_tokens must fit the context.
  Fields OpenAI defines that change nothing here (`user`, `frequency_penalty` 0, ...) are
  accepted and ignored; `logprobs`, `tools` and other unimplemented ones are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from runtime.requests import (  # prompts.jsonl's checks: a regular file, no FIFO
    MAX_IMAGE_PIXELS,
    MAX_SEED,
    MIN_TEMPERATURE,
    Request,
    RequestError,
    _open_image as open_image_file,
    image_inputs,
)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MAX_STOP = 4                      # OpenAI's limit on `stop` strings
REMOTE_TIMEOUT_S = 10.0           # --allow-remote-images: connect + each read
MAX_REMOTE_BYTES = 20 * 2**20     # --allow-remote-images: an image's bytes, at most
ROLES = ("system", "user", "assistant")
# accepted and ignored: they change nothing with n = 1 and no penalties
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,(.*)\Z", re.S)


class ChatError(Exception):
    """A request refused: `status` and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatContext:
    """What a request is checked against: the model's processor and limits, the server's defaults."""

    processor: object
    model_name: str
    context: int | None              # max_position_embeddings
    default_max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    max_image_pixels: int = MAX_IMAGE_PIXELS
    remote_images: bool = False      # --allow-remote-images
    media_dir: str | None = None     # --media-dir: file:// URLs under it
    remote_timeout_s: float = REMOTE_TIMEOUT_S
    max_remote_bytes: int = MAX_REMOTE_BYTES


@dataclass
class ChatJob:
    """A checked request: the Request to run and how to answer it."""

    request: Request
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return int(self.request.input_ids.shape[1])


def parse_chat(body, ctx: ChatContext) -> ChatJob:
    """Check `body` (parsed JSON) and build its Request; ChatError naming the field if bad."""
    if not isinstance(body, dict):
        raise ChatError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ChatError(400, "model: required, a string", param="model")
    if model != ctx.model_name:
        raise ChatError(404, f"The model `{model}` does not exist; this server serves `{ctx.model_name}`",
                        param="model", code="model_not_found")
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral, None):
            raise ChatError(400, f"{name}: only {neutral!r} is supported, got {_show(body[name])}", param=name)
    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stop", "n", "stream", "stream_options"} | IGNORED | set(NEUTRAL)
    unknown = sorted(set(body) - known)
    if unknown:
        raise ChatError(400, f"{unknown[0]}: not supported by this server", param=unknown[0])
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise ChatError(400, f"n: only 1 is supported, got {_show(n)}", param="n")
    stream = body.get("stream", False) or False
    if not isinstance(stream, bool):
        raise ChatError(400, f"stream: must be a boolean, got {_show(stream)}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ChatError(400, "stream_options: must be an object with a boolean include_usage", param="stream_options")
    if opts and not stream:
        raise ChatError(400, "stream_options: only with stream: true", param="stream_options")
    temperature = _number(body, "temperature", 1.0)
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2):
        raise ChatError(400, f"temperature: must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {temperature}",
                        param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ChatError(400, f"top_p: must be in (0, 1], got {top_p}", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise ChatError(400, f"seed: must be an integer in [0, 2^64), got {_show(seed)}", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ChatError(400, f"stop: must be a non-empty string or a list of up to {MAX_STOP}", param="stop")

    messages, images = _messages(body.get("messages"), ctx)
    processor = ctx.processor
    template = getattr(processor, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        prompt = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                               tokenize=False)
        enc = processor(images=images or None, text=[prompt], return_tensors="pt")
    except Exception as e:  # the template's or the processor's own complaint
        raise ChatError(400, f"messages: cannot be processed: {e}", param="messages") from None
    n_prompt = int(enc["input_ids"].shape[1])

    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = body.get(max_param)
    room = (ctx.context - n_prompt) if ctx.context else None
    if room is not None and room < 1:
        raise ChatError(400, f"messages: the prompt is {n_prompt} tokens; the model's context is {ctx.context}",
                        param="messages", code="context_length_exceeded")
    if max_new is None:
        max_new = ctx.default_max_tokens if room is None else min(ctx.default_max_tokens, room)
    elif not _is_int(max_new) or max_new < 1:
        raise ChatError(400, f"{max_param}: must be an integer >= 1, got {_show(max_new)}", param=max_param)
    elif room is not None and max_new > room:
        raise ChatError(400, f"{max_param}: {n_prompt} prompt tokens + {max_new} = {n_prompt + max_new} exceed "
                             f"the model's context of {ctx.context} tokens", param=max_param,
                        code="context_length_exceeded")
    pixels, sizes = image_inputs(enc) if images else (None, None)
    req = Request("", enc["input_ids"], pixels, max_new, ctx.eos_token_ids, temperature, top_p, seed,
                  image_sizes=sizes)
    return ChatJob(req, stream=stream, include_usage=bool(opts.get("include_usage")), stop=stop)


def text_only(body) -> bool:
    """Whether a chat body's messages hold text parts only: what `_messages` would take with
    no image to load (a body it would refuse counts as not text-only)."""
    try:
        return all(not isinstance(m.get("content"), list)
                   or all(isinstance(p, dict) and p.get("type") == "text" for p in m["content"])
                   for m in body["messages"])
    except (AttributeError, KeyError, TypeError):
        return False


def _messages(messages, ctx: ChatContext) -> tuple[list[dict], list]:
    """OpenAI messages -> (the template's messages, with image parts as {"type": "image"}; PIL images)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(400, "messages: must be a non-empty list", param="messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatError(400, f"{where}: must be an object with role one of {', '.join(ROLES)}", param=where)
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ChatError(400, f"{where}.content: must be a string or a list of parts", param=f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ChatError(400, f"{pw}.image_url.url: must be a string", param=f"{pw}.image_url")
                if m["role"] != "user":
                    raise ChatError(400, f"{pw}: images are taken in user messages only", param=pw)
                images.append(load_image(url, f"{pw}.image_url.url", ctx))
                parts.append({"type": "image"})
            else:
                raise ChatError(400, f"{pw}: must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                                param=pw)
        out.append({"role": m["role"], "content": parts})
    if len(images) > 1:
        raise ChatError(400, f"messages: {len(images)} images; this server takes at most one per request",
                        param="messages")
    return out, images


def load_image(url: str, where: str, ctx: ChatContext):
    """The image a URL names, as RGB (see the module docstring for what is taken)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not ctx.remote_images:
            raise ChatError(400, f"{where}: remote images are not fetched by this server (no "
                                 "--allow-remote-images); send the image as a data:image/...;base64 URL", param=where)
        return _decode(_fetch(url, where, ctx), where, ctx.max_image_pixels)
    if scheme == "file":
        return _media_file(url, where, ctx)
    m = _DATA_URL.match(url)
    if scheme != "data" or m is None:
        raise ChatError(400, f"{where}: must be a data:image/...;base64,... URL (a local path is not read)",
                        param=where)
    try:
        raw = base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ChatError(400, f"{where}: bad base64: {e}", param=where) from None
    return _decode(raw, where, ctx.max_image_pixels)


def _fetch(url: str, where: str, ctx: ChatContext) -> bytes:
    """--allow-remote-images: the bytes at `url`, within the timeout and the size cap."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "adaptlink-serve"}),
                                    timeout=ctx.remote_timeout_s) as r:
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > ctx.max_remote_bytes:
                raise ChatError(400, f"{where}: the image is {int(size)} bytes, over the {ctx.max_remote_bytes}-byte "
                                     f"limit", param=where)
            raw = r.read(ctx.max_remote_bytes + 1)
    except ChatError:
        raise
    except urllib.error.HTTPError as e:
        raise ChatError(400, f"{where}: fetching the image answered HTTP {e.code}", param=where) from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, unresolvable, timed out
        raise ChatError(400, f"{where}: the image could not be fetched: {getattr(e, 'reason', e)}",
                        param=where) from None
    if len(raw) > ctx.max_remote_bytes:
        raise ChatError(400, f"{where}: the image is over the {ctx.max_remote_bytes}-byte limit", param=where)
    return raw


def _media_file(url: str, where: str, ctx: ChatContext):
    """--media-dir: a file:// URL's image, if its real path lies under the media directory."""
    if not ctx.media_dir:
        raise ChatError(400, f"{where}: file:// images are not read by this server (no --media-dir); "
                             "send the image as a data:image/...;base64 URL", param=where)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ChatError(400, f"{where}: a file:// URL names a file on this host (file:///path)", param=where)
    root = Path(os.path.realpath(ctx.media_dir))
    path = Path(os.path.realpath(urllib.parse.unquote(parsed.path)))
    if not path.is_relative_to(root):
        raise ChatError(400, f"{where}: {parsed.path!r} is not under the --media-dir", param=where)
    try:
        return open_image_file(path, where, ctx.max_image_pixels)
    except RequestError as e:
        raise ChatError(400, str(e), param=where) from None


def _decode(raw: bytes, where: str, max_pixels: int):
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ChatError(400, f"{where}: the image is {w} x {h} = {w * h} pixels, over the "
                                     f"{max_pixels}-pixel limit", param=where)
            return im.convert("RGB")
    except ChatError:
        raise
    except Image.DecompressionBombError as e:
        raise ChatError(400, f"{where}: the image is over the pixel limit: {e}", param=where) from None
    except Exception as e:  # PIL: OSError, ValueError, SyntaxError, EOFError ... for what is not an image
        raise ChatError(400, f"{where}: not an image PIL can read: {e}", param=where) from None


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ChatError(400, f"{name}: must be a finite number, got {_show(v)}", param=name)
    return float(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
