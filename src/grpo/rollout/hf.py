"""Reference engine: plain `transformers` generate, each prompt repeated G times.

Simple and obviously correct; the baseline the fast engine is measured against. It samples exactly as the run's
`sampling` section says: `generate` would otherwise fill every option the call leaves unset from the model
folder's generation_config.json (Qwen2.5-Instruct sets repetition_penalty, top_k and top_p there; transformers
itself defaults to top_k=50), and the rollouts would silently come from another distribution than the policy's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from grpo.core.logprobs import left_pad  # engines pad prompts the way training does
from grpo.models import pad_token_id
from grpo.rollout.base import (
    LogprobKind,
    Rollout,
    SamplingParams,
    draw_seeds,
    rollout_from_raw,
)
from grpo.rollout.session import TranscriptSession


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config EOS."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token: completions could never end")
    return ids


def generation_options(params: SamplingParams) -> dict:
    """generate's options for `params`, every one that shapes the distribution set (top_k=0 is off; left unset,
    generate would take transformers' default of 50)."""
    if params.greedy:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                min_p=params.min_p if params.min_p > 0 else None)


@contextmanager
def blank_generation_config(model):
    """Within the block `model.generate` sees a default GenerationConfig instead of the folder's (peft: the base
    model's, which its generate reads), so nothing from generation_config.json reaches the sampling."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


class HFGenerateEngine:
    """Samples with `model.generate` under the run's sampling parameters only; returns the log-prob of each sampled
    token under the tempered distribution over the whole vocabulary (generate's raw logits / temperature)."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)

    @classmethod
    def from_config(cls, sampling, model, tokenizer) -> HFGenerateEngine:
        """The engine for a run's `sampling` section; generate has no options of its own."""
        return cls(model, tokenizer)

    def logprob_kind(self, params: SamplingParams) -> LogprobKind:
        """POLICY: it samples with the policy itself, and reports the whole tempered distribution's log-probs
        (also under top-p / top-k / min-p)."""
        return LogprobKind.POLICY

    def describe(self) -> str:
        return "hf engine: transformers generate"

    def episodes(self, prompt_ids, group_size, seeds):
        """Multi-turn sampling: each turn one generate over every live episode's whole transcript."""
        return TranscriptSession(self, prompt_ids, group_size, seeds)

    def sync_weights(self, model) -> None:  # same model object: nothing to copy
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids, group_size, params: SamplingParams, generator=None, seeds=None) -> Rollout:
        """G samples for each prompt. Sampled, each group runs as its own generate call under its own seed
        (seeds[b], or drawn from `generator`), so it draws the same stream whatever else is in the batch;
        greedy, all prompts run as one batch."""
        if params.greedy:
            raw, logprobs = self._generate([p for p in prompt_ids for _ in range(group_size)], params, None)
        else:
            seeds = seeds if seeds is not None else draw_seeds(generator, len(prompt_ids))
            if len(seeds) != len(prompt_ids):
                raise ValueError(f"got {len(seeds)} group seeds for {len(prompt_ids)} prompts")
            parts = [self._generate([p] * group_size, params, seed) for p, seed in zip(prompt_ids, seeds)]
            width = max(r.shape[1] for r, _ in parts)
            pad = lambda x, value: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
            raw = torch.cat([pad(r, self.pad_id) for r, _ in parts])
            logprobs = torch.cat([pad(lp, 0.0) for _, lp in parts])
        return rollout_from_raw(prompt_ids, raw, logprobs, group_size, params, self.eos_ids, self.pad_id,
                                self.tokenizer)

    def _generate(self, rows: list[list[int]], params: SamplingParams, seed: int | None):
        """Raw sampled ids [n, T'] and the log-prob of each under the tempered distribution [n, T'] (greedy:
        temperature 1); torch's global RNG seeded with `seed` for the call, then restored."""
        device = next(self.model.parameters()).device
        ids, attn = left_pad(rows, self.pad_id)
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            output_logits=True,
            return_dict_in_generate=True,
            **generation_options(params),
        )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            was_training = self.model.training
            self.model.eval()
            with blank_generation_config(self.model):
                out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
            self.model.train(was_training)
        raw = out.sequences[:, ids.shape[1] :].cpu()  # [n, T']
        logits = torch.stack(out.logits, dim=1).float().cpu()  # [n, T', V] the model's, before any processing
        if not params.greedy and params.temperature != 1.0:
            logits = logits / params.temperature
        return raw, logits.log_softmax(-1).gather(-1, raw.unsqueeze(-1)).squeeze(-1)  # [n, T']
