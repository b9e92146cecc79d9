"""Rollout engines behind one interface (see base.py); pick one by name with `make_engine`."""

from __future__ import annotations

from grpo.rollout.base import Rollout, RolloutEngine, SamplingParams, finish_completions
from grpo.rollout.engine import FastEngine
from grpo.rollout.hf import HFGenerateEngine

# name -> engine class; every class takes (model, tokenizer, **options)
ENGINES: dict[str, type] = {"hf": HFGenerateEngine, "fast": FastEngine}


def make_engine(name: str, model, tokenizer, **options) -> RolloutEngine:
    """The engine registered under `name`, built on `model` and `tokenizer`."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, **options)


__all__ = [
    "ENGINES",
    "FastEngine",
    "HFGenerateEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "finish_completions",
    "make_engine",
]
