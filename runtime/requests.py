"""Requests in (prompts.jsonl) and results out (out.jsonl), as docs/DESIGN.md defines them.

A line that cannot be served fails alone: it becomes `{"id", "error"}` in out.jsonl, the
message naming the file, line and field, and every other request is still served. Every
id given appears exactly once in the output. What is refused, per line, and why:

- The file is read as bytes, one line at a time: a line longer than `MAX_LINE_BYTES`
  (8 MiB) is refused unread (its bytes are skipped, not parsed or tokenized), so the work
  one line can cost before the checks below is bounded; each line is decoded as UTF-8 on
  its own (a BOM on line 1 is allowed), so a stray byte fails that line only. JSON nested
  too deeply or an integer of over 4300 digits fails its line, not the run.
- `id`: a string or an integer (not a bool, float or null), echoed as given (an integer
  stays an integer). A line without one gets `line<N>`, or `line<N>~<k>` for the first k
  that no line of the file gives, so a generated id never equals a given one. An id
  given twice fails its later lines.
- `max_new_tokens`: an integer in [1, context], where context is the text model's
  `max_position_embeddings`; and prompt tokens (image tokens included) + max_new_tokens
  must fit in context. Past it the rotary positions leave the range the model was trained
  for and HF generate would serve garbage silently (a 4x-context request was served).
- Work budget: the policy is to refuse, not to chunk. A request's one prefill is at most
  `context` tokens (4096 for LLaVA-1.5), the model's own bound, so no request stalls the
  others for longer than one context-length prefill; a 1 MB prompt is refused by the
  context check once tokenized, and tokenizing is bounded by the line cap.
- `temperature`: finite, and 0 (greedy) or >= `MIN_TEMPERATURE` (1e-3): logits / 1e-310
  overflow float32 to inf and the softmax becomes NaN. `top_p` finite in (0, 1].
- `seed`: an integer in [0, 2^64), the range `torch.Generator.manual_seed` takes.
- `input_ids` (pre-tokenised, for presets): integers in [0, vocab_size), without the
  image token (no image goes with them); `stop_token_ids` likewise in [0, vocab_size).
- `image`: a path to a regular file, checked with stat before opening and with fstat on
  the descriptor, opened O_NONBLOCK, so a FIFO or a device file is refused without
  blocking; its pixel count (read from the header) at most `MAX_IMAGE_PIXELS` (2^26,
  8192 x 8192, 192 MB decoded as RGB, below PIL's own warning threshold of 89.5 M), so a
  48 KB PNG declaring 20000 x 20000 pixels is refused before it is decoded; anything PIL
  cannot decode fails that line with PIL's message.

Rows reach out.jsonl as requests finish (ResultWriter), and what a run could not
finish is completed with error rows (the coordinator's fatal path, or `complete_output`
in the launcher when the coordinator itself died), so every id given appears exactly once
in the output however the run ends.

Length: ~550 lines, over the house style's ~500: the check of every field a request line
may carry (each refused alone, naming the field) and the out.jsonl writer that keeps every
finished row, one contract read and written in one place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from partitioner.errors import AdaptLinkError

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8 * 2**20        # a prompts.jsonl line longer than this is refused unread
MAX_IMAGE_PIXELS = 2**26          # 8192 x 8192
MIN_TEMPERATURE = 1e-3            # below it (but > 0) logits / T can overflow float32
MAX_SEED = 2**64                  # exclusive: torch.Generator.manual_seed's range
NO_CONTEXT_MAX_NEW_TOKENS = 2**16  # the max_new_tokens bound when the model's context is not given
_MAX_TOKEN_ID = 2**63             # exclusive: an int64 tensor's range, when the vocabulary is not given


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What the model can take; `read_prompts` refuses a request beyond it, naming the field."""

    context: int | None = None
    """Positions the text model has (`text_config.max_position_embeddings`); None: unchecked."""
    vocab_size: int | None = None
    """Token ids are in [0, vocab_size); None: [0, 2^63)."""
    image_token_id: int | None = None
    """The id an image expands into; refused in `input_ids` (which take no image)."""
    max_line_bytes: int = MAX_LINE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_config(cls, config) -> "RequestLimits":
        """The limits of a `LlavaConfig`."""
        text = config.text_config
        return cls(context=getattr(text, "max_position_embeddings", None),
                   vocab_size=getattr(text, "vocab_size", None),
                   image_token_id=getattr(config, "image_token_index", None))


@dataclass
class Request:
    """One request, ready to run: token ids and (optionally) pixels."""

    id: str | int                           # as given in prompts.jsonl (or generated: line<N>)
    input_ids: torch.Tensor                 # [1, S] int64
    pixel_values: torch.Tensor | None       # [n_img, 3, H, W] or None (text only)
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    temperature: float = 0.0                # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    index: int = 0                          # position among the served requests (internal id on the wire)
    line: int = 0                           # line number in prompts.jsonl (out.jsonl keeps this order)
    image_sizes: torch.Tensor | None = None  # LLaVA-NeXT: [n_img, 2] (height, width); pixel_values are its tiles


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
                 eos_token_ids: frozenset[int] = frozenset(),
                 limits: RequestLimits | None = None) -> tuple[list[Request], list[Result]]:
    """Parse prompts.jsonl: (requests to run, results already decided for bad lines).

    Two passes: every line is parsed first, so that the ids generated for lines without
    one (`line<N>`) can avoid every id the file gives, wherever it is given."""
    path = Path(path)
    limits = limits or RequestLimits()
    requests, failed, seen = [], [], set()
    for lineno, obj, error, rid in _identified(path, limits.max_line_bytes):
        try:
            if error is not None:
                raise RequestError(error)
            if "id" in obj and not _valid_id(obj["id"]):
                raise RequestError(f"{path}:{lineno}: id: must be a string or an integer, got {_show(obj['id'])}")
            if rid in seen:
                raise RequestError(f"{path}:{lineno}: id: {_show(rid)} appears twice")
            seen.add(rid)
            req = _make_request(obj, path, lineno, path.parent, processor, default_max_new_tokens,
                                eos_token_ids, limits)
            req.id, req.index, req.line = rid, len(requests), lineno
            requests.append(req)
        except RequestError as e:
            log.warning("%s", e)
            failed.append(Result(id=rid, error=str(e), line=lineno))
        except Exception as e:  # a check this reader lacks: still this line's failure, not the run's
            log.exception("%s:%d: unexpected error reading the request", path, lineno)
            failed.append(Result(id=rid, error=f"{path}:{lineno}: cannot be served: {type(e).__name__}: {e}",
                                 line=lineno))
    return requests, failed


def _identified(path: Path, cap: int) -> list[tuple[int, dict | None, str | None, str | int]]:
    """(line, object or None, error or None, id) of every non-blank line: the id as given, or
    generated (`line<N>`, avoiding every id the file gives, wherever it is given)."""
    parsed: list[tuple[int, dict | None, str | None]] = []
    for lineno, raw, error in _lines(path, cap):
        if error is None:
            try:
                parsed.append((lineno, _parse_line(raw, lineno), None))
            except RequestError as e:
                parsed.append((lineno, None, f"{path}:{lineno}: {e}"))
            except _Blank:
                continue
        else:
            parsed.append((lineno, None, f"{path}:{lineno}: {error}"))
    taken = {obj["id"] for _, obj, _ in parsed if obj is not None and _valid_id(obj.get("id"))}
    return [(lineno, obj, error,
             obj["id"] if obj is not None and _valid_id(obj.get("id")) else _generated_id(lineno, taken))
            for lineno, obj, error in parsed]


def prompt_ids(path: str | Path, cap: int = MAX_LINE_BYTES) -> list[tuple[int, str | int]]:
    """(line number, id) of every non-blank line of prompts.jsonl, named as `read_prompts`
    names them, without tokenising anything: what the launcher needs to complete out.jsonl
    when the coordinator could not."""
    return [(lineno, rid) for lineno, _, _, rid in _identified(Path(path), cap)]


def id_key(rid) -> str:
    """An id as a dict key that tells the integer 1 from the string "1" (ids are echoed as given)."""
    return json.dumps(rid)


class _Blank(Exception):
    """A blank line: no request, no row."""


def _lines(path: Path, cap: int):
    """(line number, bytes, None) per line, or (line number, None, why) for one over `cap` bytes."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AdaptLinkError(f"{path}: cannot be read: {e.strerror or e}") from None
    with f:
        lineno = 0
        while raw := f.readline(cap + 1):
            lineno += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                n = len(raw)
                while more := f.readline(2**20):  # skip the rest of it, unread
                    n += len(more)
                    if more.endswith(b"\n"):
                        break
                yield lineno, None, f"line of {n} bytes is longer than the {cap}-byte limit; not read"
            else:
                yield lineno, raw, None


def _parse_line(raw: bytes, lineno: int) -> dict:
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} ({e.reason})") from None
    if not text.strip():
        raise _Blank
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"not valid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting past the recursion limit
        raise RequestError(f"not valid JSON: {str(e).splitlines()[0] if str(e) else 'nested too deeply'}") from None
    if not isinstance(obj, dict):
        raise RequestError("expected a JSON object")
    return obj


def _valid_id(v) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _generated_id(lineno: int, taken: set) -> str:
    rid, k = f"line{lineno}", 0
    while rid in taken:
        k += 1
        rid = f"line{lineno}~{k}"
    taken.add(rid)
    return rid


def _show(v, limit: int = 60) -> str:
    """A field's value as JSON, cut short: messages never carry a 4000-digit number whole."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = type(v).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> float | None:
    """`v` as a finite float, or None (not a number, a bool, NaN, +-inf, an int too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _make_request(obj: dict, path, lineno, base: Path, processor, default_max, eos,
                  limits: RequestLimits) -> Request:
    where = f"{path}:{lineno}"
    max_cap = limits.context or NO_CONTEXT_MAX_NEW_TOKENS
    cap_why = "the model's max_position_embeddings" if limits.context else "the limit"
    given = "max_new_tokens" in obj
    max_new = obj.get("max_new_tokens", default_max)
    if not _is_int(max_new) or not 1 <= max_new <= max_cap:
        src = "" if given else " (the default, --max-new-tokens)"
        raise RequestError(f"{where}: max_new_tokens{src}: must be an integer in [1, {max_cap}] ({cap_why}), "
                           f"got {_show(max_new)}")
    id_hi = limits.vocab_size or _MAX_TOKEN_ID
    stop = obj.get("stop_token_ids", [])
    if not isinstance(stop, list) or not all(_is_int(t) and 0 <= t < id_hi for t in stop):
        raise RequestError(f"{where}: stop_token_ids: must be a list of token ids in [0, {id_hi})")
    temperature = obj.get("temperature", 0.0)
    t = _finite(temperature)
    if t is None or not (t == 0 or t >= MIN_TEMPERATURE):
        raise RequestError(f"{where}: temperature: must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                           f"got {_show(temperature)}")
    top_p = obj.get("top_p", 1.0)
    p = _finite(top_p)
    if p is None or not 0 < p <= 1:
        raise RequestError(f"{where}: top_p: must be in (0, 1], got {_show(top_p)}")
    seed = obj.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise RequestError(f"{where}: seed: must be an integer in [0, 2^64), got {_show(seed)}")

    image = obj.get("image")
    pil = None
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(f"{where}: image: must be a file path string")
        pil = _open_image(Path(image) if Path(image).is_absolute() else base / image, where,
                          limits.max_image_pixels)

    if "input_ids" in obj:  # pre-tokenised (presets have no tokenizer)
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids:
            raise RequestError(f"{where}: input_ids: must be a non-empty list of token ids")
        for i, tok in enumerate(ids):
            if not _is_int(tok) or not 0 <= tok < id_hi:
                raise RequestError(f"{where}: input_ids[{i}]: must be a token id in [0, {id_hi}), got {_show(tok)}")
        if limits.image_token_id is not None and limits.image_token_id in ids:
            raise RequestError(f"{where}: input_ids: holds the image token {limits.image_token_id}, "
                               f"but input_ids take no image")
        if pil is not None:
            raise RequestError(f"{where}: input_ids with image: give a prompt with <image> instead")
        _check_context(where, "input_ids", len(ids), max_new, limits)
        return Request("", torch.tensor([ids]), None, max_new, frozenset(stop) | eos, t, p, seed)

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
    _check_context(where, "prompt", enc["input_ids"].shape[1], max_new, limits)
    pixels, sizes = image_inputs(enc)
    return Request("", enc["input_ids"], pixels, max_new, frozenset(stop) | eos, t, p, seed, image_sizes=sizes)


def image_inputs(enc) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A processor's output for one image -> (pixel_values, image_sizes) as a Request holds
    them: LLaVA-NeXT's `[1, n_tiles, 3, S, S]` becomes its tiles `[n_tiles, 3, S, S]`, with
    `image_sizes` `[1, 2]`; LLaVA's pixels stay `[1, 3, S, S]` (image_sizes None)."""
    pixels, sizes = enc.get("pixel_values"), enc.get("image_sizes")
    if pixels is not None and pixels.dim() == 5:
        pixels = pixels[0]
    return pixels, sizes


def _check_context(where: str, name: str, n: int, max_new: int, limits: RequestLimits) -> None:
    if limits.context is not None and n + max_new > limits.context:
        raise RequestError(f"{where}: {name} + max_new_tokens: {n} prompt tokens + {max_new} new = {n + max_new} "
                           f"exceed the model's {limits.context} positions (max_position_embeddings)")


def _open_image(p: Path, where: str, max_pixels: int):
    """The image at `p` as RGB: a regular file, at most `max_pixels`, decoded by PIL.

    stat before opening refuses a FIFO or device by its path; O_NONBLOCK and fstat on the
    descriptor refuse one swapped in between without blocking on it."""

    try:
        regular = stat.S_ISREG(os.stat(p).st_mode)
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if regular else None
    except FileNotFoundError:
        raise RequestError(f"{where}: image: no such file {str(p)!r}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise RequestError(f"{where}: image: cannot open {str(p)!r}: {getattr(e, 'strerror', None) or e}") from None
    if fd is None:
        raise RequestError(f"{where}: image: {str(p)!r} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RequestError(f"{where}: image: {str(p)!r} is not a regular file")
        try:
            with Image.open(f) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise RequestError(f"{where}: image: {str(p)!r} is {w} x {h} = {w * h} pixels, "
                                       f"over the {max_pixels}-pixel limit")
                return im.convert("RGB")
        except RequestError:
            raise
        except Image.DecompressionBombError as e:
            raise RequestError(f"{where}: image: {str(p)!r} is over the pixel limit: {e}") from None
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, ... for bad files
            raise RequestError(f"{where}: image: cannot read {str(p)!r}: {e}") from None


class OutputError(AdaptLinkError):
    """out.jsonl (or the metrics file) cannot be written: the message names the file."""


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
    return {id_key(r["id"]): r for r in read_rows(path) if "error" not in r}


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
        by_id.setdefault(id_key(r["id"]), []).append(r)
    ordered, added = [], []
    for _, rid in prompt_ids(prompts):
        if by_id.get(id_key(rid)):
            ordered.append(by_id[id_key(rid)].pop(0))
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
