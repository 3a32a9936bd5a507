"""Requests in (prompts.jsonl) and results out (out.jsonl), as DESIGN.md defines them.

A malformed line fails that request only: it becomes `{"id", "error"}` in out.jsonl and
every other request is still served. Every id given appears exactly once in the output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One request, ready to run: token ids and (optionally) pixels."""

    id: str
    input_ids: torch.Tensor                 # [1, S] int64
    pixel_values: torch.Tensor | None       # [n_img, 3, H, W] or None (text only)
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    temperature: float = 0.0                # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    index: int = 0                          # position among the served requests (internal id on the wire)
    line: int = 0                           # line number in prompts.jsonl (out.jsonl keeps this order)


@dataclass
class Result:
    id: str
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None
    replays: int = 0
    line: int = 0                           # its request's line in prompts.jsonl (not written)

    def to_json(self) -> dict:
        if self.error is not None:
            return {"id": self.id, "error": self.error, "tokens": self.tokens}
        d = {"id": self.id, "tokens": self.tokens, "text": self.text,
             "ttft_s": self.ttft_s, "latency_s": self.latency_s}
        if self.replays:
            d["replays"] = self.replays
        return d


class RequestError(ValueError):
    """A request line that cannot be served; the message names the line and field."""


def read_prompts(path: str | Path, processor, *, default_max_new_tokens: int = 32,
                 eos_token_ids: frozenset[int] = frozenset()) -> tuple[list[Request], list[Result]]:
    """Parse prompts.jsonl: (requests to run, results already decided for bad lines)."""
    path = Path(path)
    requests, failed, seen = [], [], set()
    base = path.parent
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rid = f"line{lineno}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RequestError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise RequestError(f"{path}:{lineno}: expected a JSON object")
            rid = str(obj.get("id", rid))
            if rid in seen:
                raise RequestError(f"{path}:{lineno}: id: {rid!r} appears twice")
            seen.add(rid)
            req = _make_request(obj, path, lineno, base, processor, default_max_new_tokens, eos_token_ids)
            req.id, req.index, req.line = rid, len(requests), lineno
            requests.append(req)
        except RequestError as e:
            log.warning("%s", e)
            failed.append(Result(id=rid, error=str(e), line=lineno))
    return requests, failed


def _make_request(obj: dict, path, lineno, base: Path, processor, default_max, eos) -> Request:
    where = f"{path}:{lineno}"
    max_new = obj.get("max_new_tokens", default_max)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise RequestError(f"{where}: max_new_tokens: must be a positive integer, got {max_new!r}")
    stop = obj.get("stop_token_ids", [])
    if not isinstance(stop, list) or not all(isinstance(t, int) for t in stop):
        raise RequestError(f"{where}: stop_token_ids: must be a list of integers")
    temperature = obj.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestError(f"{where}: temperature: must be a number >= 0, got {temperature!r}")
    top_p = obj.get("top_p", 1.0)
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(f"{where}: top_p: must be in (0, 1], got {top_p!r}")
    seed = obj.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise RequestError(f"{where}: seed: must be an integer")

    image = obj.get("image")
    pil = None
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(f"{where}: image: must be a file path string")
        from PIL import Image, UnidentifiedImageError

        p = Path(image) if Path(image).is_absolute() else base / image
        try:
            with Image.open(p) as im:
                pil = im.convert("RGB")
        except FileNotFoundError:
            raise RequestError(f"{where}: image: no such file {str(p)!r}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise RequestError(f"{where}: image: cannot read {str(p)!r}: {e}") from None

    if "input_ids" in obj:  # pre-tokenised (presets have no tokenizer)
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise RequestError(f"{where}: input_ids: must be a non-empty list of token ids")
        if pil is not None:
            raise RequestError(f"{where}: input_ids with image: give a prompt with <image> instead")
        return Request("", torch.tensor([ids]), None, max_new, frozenset(stop) | eos,
                       float(temperature), float(top_p), seed)

    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(f"{where}: prompt: must be a non-empty string")
    if processor is None:
        raise RequestError(f"{where}: prompt: this model has no tokenizer (a preset); give input_ids")
    token = getattr(processor, "image_token", "<image>")
    n_tags = prompt.count(token)
    if pil is None and n_tags:
        raise RequestError(f"{where}: prompt has {n_tags} {token} but no image is given")
    if pil is not None and n_tags != 1:
        raise RequestError(f"{where}: prompt: must hold exactly one {token} for its image, found {n_tags}")
    try:
        enc = processor(images=[pil] if pil is not None else None, text=[prompt], return_tensors="pt")
    except Exception as e:  # the processor's own complaint, tied to this line
        raise RequestError(f"{where}: cannot be processed: {e}") from None
    return Request("", enc["input_ids"], enc.get("pixel_values"), max_new, frozenset(stop) | eos,
                   float(temperature), float(top_p), seed)


def write_results(path: str | Path, results: list[Result]) -> None:
    """One line per request line, in input order (a failed line where it was given)."""
    with open(path, "w") as f:
        for r in sorted(results, key=lambda r: r.line):
            f.write(json.dumps(r.to_json()) + "\n")


def choose_token(logits: torch.Tensor, req: Request, generator: torch.Generator | None) -> int:
    """Greedy, or seeded temperature / top-p sampling, from float32 logits [V]."""
    if req.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < req.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
