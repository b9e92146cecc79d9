"""Rollout engines behind one contract (see base.py); `make_engine` builds the one a run's config names."""

from __future__ import annotations

from grpo.rollout.base import (
    LogprobKind,
    Rollout,
    RolloutEngine,
    SamplingParams,
    finish_completions,
)
from grpo.rollout.engine import FastEngine
from grpo.rollout.full_copy import FullCopyEngine
from grpo.rollout.hf import HFGenerateEngine
from grpo.rollout.vllm_engine import VLLMEngine  # imports vllm only when one is built

# sampling.engine -> engine class; each builds itself from the sampling section (`from_config`)
ENGINES: dict[str, type] = {"hf": HFGenerateEngine, "fast": FastEngine, "vllm": VLLMEngine}


def make_engine(sampling, model, tokenizer) -> RolloutEngine:
    """The engine a run's `sampling` section (grpo.config.SamplingConfig) names, built from that section."""
    if sampling.engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {sampling.engine!r}; valid: {sorted(ENGINES)}")
    return ENGINES[sampling.engine].from_config(sampling, model, tokenizer)


__all__ = [
    "ENGINES",
    "FastEngine",
    "FullCopyEngine",
    "HFGenerateEngine",
    "LogprobKind",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "finish_completions",
    "make_engine",
]
