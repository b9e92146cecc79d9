"""Rollout engines behind one interface (grpo.rollout.base), chosen by name."""

from __future__ import annotations

from grpo.rollout.base import Rollout, RolloutEngine, SamplingParams
from grpo.rollout.hf import HFGenerateEngine

ENGINES: dict[str, type] = {"hf": HFGenerateEngine}


def make_engine(name: str, model, tokenizer) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer)


__all__ = ["ENGINES", "Rollout", "RolloutEngine", "SamplingParams", "make_engine"]
