"""Requests in (prompts.jsonl) and results out (out.jsonl), as DESIGN.md defines them.

A malformed line fails that request only: it becomes `{"id", "error"}` in out.jsonl and
every other request is still served. Every id given appears exactly once in the output,
however the run ends: rows are written as requests finish (ResultWriter), and what a run
could not finish is completed with error rows (the coordinator's fatal path, or
`complete_output` in the launcher when the coordinator itself died).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptlink.errors import AdaptLinkError

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


class OutputError(AdaptLinkError):
    """out.jsonl (or the metrics file) cannot be written: the message names the file."""


def prompt_ids(path: str | Path) -> list[tuple[int, str]]:
    """(line number, id) of every non-blank line of prompts.jsonl, as `read_prompts` names
    them (`line<N>` where a line gives no id or is not JSON), without tokenising anything:
    what the launcher needs to complete out.jsonl when the coordinator could not."""
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        out.append((lineno, str(obj.get("id", f"line{lineno}")) if isinstance(obj, dict) else f"line{lineno}"))
    return out


def read_rows(path: str | Path) -> list[dict]:
    """The rows of an existing out.jsonl. A torn last line (a crash mid-write) is dropped;
    an unparsable line before the last is refused, naming the file and line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not a row")
        except ValueError:
            if lineno == len(lines):
                log.warning("%s:%d: a torn last line (an interrupted write) is dropped", path, lineno)
                break
            raise OutputError(f"{path}:{lineno}: not an out.jsonl row (expected a JSON object with an id)") from None
        rows.append(row)
    return rows


def completed_rows(path: str | Path) -> dict[str, dict]:
    """`--resume`: the rows of an existing out.jsonl that finished (no `error`), by id."""
    if not Path(path).exists():
        return {}
    return {str(r["id"]): r for r in read_rows(path) if "error" not in r}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_rows_atomically(path: str | Path, rows: list[dict]) -> None:
    """Replace `path` by `rows`, all or nothing: a temporary file beside it, fsynced, then
    os.replace (a crash or a full disk leaves the old file whole, never half of the new)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        _fsync_dir(path)  # the rename itself survives a power loss
    except OSError:
        pass


class ResultWriter:
    """out.jsonl, written as requests finish, so that nothing finished is lost.

    `start(kept)` begins the file for this run (a stale file from an earlier run is
    replaced at once) holding `kept`: (line, row) pairs decided before serving — bad lines,
    and with --resume the rows an earlier run completed. `add(result)` appends one row and
    flushes it to the OS (a SIGKILL of this process loses nothing written; one os.write
    per row, so no row is interleaved). `close()` fsyncs, and rewrites the file in input
    order (temp file + os.replace) when rows finished out of order, so the documented
    "one line per input line, in input order" holds at a clean end.

    A write that fails (a full disk: ENOSPC; a read-only remount: EROFS) truncates the
    file back to its last whole row and raises OutputError naming the file; later rows
    are kept in memory only (`failed` says why), and `add` raises no more.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[tuple[int, dict]] = []   # (line in prompts.jsonl, row), in write order
        self.failed: str | None = None
        self._fd: int | None = None
        self._size = 0                           # bytes of whole rows on disk

    def start(self, kept: list[tuple[int, dict]] = ()) -> "ResultWriter":
        kept = sorted(kept, key=lambda lr: lr[0])
        write_rows_atomically(self.path, [r for _, r in kept])  # the old file stays whole until this
        self.rows = list(kept)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {e.strerror or e}") from None
        return self

    def add(self, result: Result) -> None:
        self.add_row(result.line, result.to_json())

    def add_row(self, line: int, row: dict) -> None:
        self.rows.append((line, row))
        if self.failed is not None or self._fd is None:
            return
        data = (json.dumps(row) + "\n").encode()
        try:
            done = 0
            while done < len(data):  # a short write (the disk filled mid-row) goes on to its error
                done += os.write(self._fd, data[done:])
            self._size += len(data)
        except OSError as e:
            self.failed = f"{self.path}: cannot write: {e.strerror or e}"
            try:
                os.ftruncate(self._fd, self._size)  # only whole rows stay
            except OSError:
                pass
            raise OutputError(self.failed) from None

    def close(self, reorder: bool = True) -> None:
        """fsync; with `reorder`, put the rows in input order (only if they are not already)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.failed is None:
                os.fsync(fd)
        except OSError as e:
            self.failed = f"{self.path}: cannot write: {e.strerror or e}"
        finally:
            os.close(fd)
        if self.failed is not None:
            raise OutputError(self.failed)
        lines = [ln for ln, _ in self.rows]
        if reorder and lines != sorted(lines):
            write_rows_atomically(self.path, [r for _, r in sorted(self.rows, key=lambda lr: lr[0])])


def complete_output(out: str | Path, prompts: str | Path, reason: str) -> list[str]:
    """After a run whose coordinator could not finish out.jsonl (SIGKILLed, hung, crashed):
    an error row `reason` for every line of prompts.jsonl with no row, the rows put in input
    order (a torn last line dropped). Returns the ids given error rows; the file is left
    alone when it is already whole and in order."""
    out = Path(out)
    rows = read_rows(out) if out.exists() else []
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(str(r["id"]), []).append(r)
    ordered, added = [], []
    for _, rid in prompt_ids(prompts):
        if by_id.get(rid):
            ordered.append(by_id[rid].pop(0))
        else:
            ordered.append({"id": rid, "error": reason, "tokens": []})
            added.append(rid)
    left = sum(len(v) for v in by_id.values())
    if left:
        log.warning("%s: %d rows name no line of %s; dropped", out, left, prompts)
    if ordered != rows or not out.exists():
        write_rows_atomically(out, ordered)
    return added


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
