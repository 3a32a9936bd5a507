"""Shared fixtures: tiny random-weight LLaVA checkpoints built offline, once per session."""
from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """`make_ckpt(**overrides)` -> directory of a tiny checkpoint (TinySpec overrides), cached."""
    from adaptlink.model.tiny import make_tiny

    built: dict[str, os.PathLike] = {}

    def make(**overrides):
        key = repr(sorted(overrides.items()))
        if key not in built:
            built[key] = make_tiny(tmp_path_factory.mktemp("ckpt"), **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt):
    return make_ckpt()
