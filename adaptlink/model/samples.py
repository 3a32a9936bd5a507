"""Sample requests for tests, the demo and the experiments: prompts of varied length, each
with one `<image>`, and distinct synthetic images; `prompts.jsonl` written and read.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from partitioner.errors import AdaptLinkError

REQUESTS_FILE = "prompts.jsonl"

# Prompts of clearly different lengths; each holds exactly one <image>.
_PROMPTS = [
    "USER: <image>\nWhat is this? ASSISTANT:",
    "<image>\nCaption:",
    "USER: <image>\nDescribe the picture in detail, including the colours, shapes and "
    "anything unusual. ASSISTANT:",
    "USER: Look at this: <image>\nHow many people are in the photo? ASSISTANT:",
    "Question: what is the object in the centre of <image> used for? Answer:",
    "USER: <image>\nWrite a short story about what happens next in this scene, and say "
    "whether it is day or night. ASSISTANT:",
]


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts, each with one `<image>`, lengths varying (cycles a fixed list)."""
    order = list(range(len(_PROMPTS)))
    random.Random(seed).shuffle(order)
    return [_PROMPTS[order[i % len(order)]] for i in range(n)]


def sample_images(n: int, size: int | tuple[int, int] = (48, 40), seed: int = 0) -> list["Image.Image"]:
    """`n` distinct RGB images (width, height = `size`): gradients, stripes, checks, noise."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for i in range(n):
        kind = i % 4
        c = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)  # two colours
        if kind == 0:    # diagonal gradient between the two colours
            t = ((xx / max(w - 1, 1) + yy / max(h - 1, 1)) / 2)[..., None]
        elif kind == 1:  # stripes at a random period and angle
            period, ang = rng.uniform(3, 12), rng.uniform(0, np.pi)
            t = (np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period) > 0)[..., None]
        elif kind == 2:  # checkerboard
            k = int(rng.integers(2, 9))
            t = (((xx // k) + (yy // k)) % 2)[..., None]
        else:            # noise
            t = rng.uniform(0, 1, size=(h, w, 1))
        arr = c[0] * (1 - t) + c[1] * t + rng.normal(0, 8, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return images


def sample_requests(n: int = 4, seed: int = 0, max_new_tokens: int = 16,
                    sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """In-memory requests `{"id", "prompt", "image": PIL.Image, "max_new_tokens"}`; `sizes`:
    the images' (width, height), in turn (LLaVA-NeXT's token count depends on them)."""
    if sizes:
        images = [sample_images(1, size=sizes[i % len(sizes)], seed=seed * 1000 + i)[0] for i in range(n)]
    else:
        images = sample_images(n, seed=seed)
    return [
        {"id": f"r{i}", "prompt": p, "image": img, "max_new_tokens": max_new_tokens}
        for i, (p, img) in enumerate(zip(sample_prompts(n, seed), images))
    ]


def write_sample_requests(out_dir: str | os.PathLike, n: int = 4, seed: int = 0,
                          max_new_tokens: int = 16, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write `n` PNGs and `prompts.jsonl` (docs/DESIGN.md format) into `out_dir`; return the jsonl.

    `image` fields are absolute paths; `read_requests` also accepts paths relative to
    the jsonl's directory. `sizes` as for `sample_requests`.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for req in sample_requests(n, seed, max_new_tokens, sizes):
        png = out / f"{req['id']}.png"
        req["image"].save(png)
        lines.append(json.dumps({"id": req["id"], "prompt": req["prompt"], "image": str(png),
                                 "max_new_tokens": req["max_new_tokens"]}))
    path = out / REQUESTS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def read_requests(path: str | os.PathLike) -> list[dict]:
    """Requests from a `prompts.jsonl`; relative image paths are resolved against its dir."""
    path = Path(path)
    reqs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            missing = [k for k in ("id", "prompt", "image") if k not in req]
        except json.JSONDecodeError as e:
            raise AdaptLinkError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if missing:
            raise AdaptLinkError(f"{path}:{lineno}: missing field(s) {missing}")
        img = Path(req["image"])
        req["image"] = str(img if img.is_absolute() else path.parent / img)
        reqs.append(req)
    return reqs


def open_image(image) -> Image.Image:
    """An RGB PIL image from a path or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")
