"""The rollout contract: prompts in, G sampled completions per prompt out.

Every generation engine (plain `transformers` generate, our batched KV-cache
sampler, later vLLM) fills the same two types and answers the same four calls,
so the trainer never knows which one it is talking to:

    engine = ENGINE.from_config(sampling_section, model, tokenizer)   # grpo.rollout.make_engine
    rollout = engine.generate(prompt_ids, G, params, seeds=group_seeds)
    engine.sync_weights(model)        # the trainer, after every optimizer update
    engine.logprob_kind(params)       # are the sampled log-probs the policy's own?
    engine.describe()                 # one line for the run's log
    session = engine.episodes(prompt_ids, G, seeds=group_seeds)       # multi-turn: EpisodeSession
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature == 0 means greedy decoding."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019); 1.0 disables it
    top_k: int = 0  # keep the k most likely tokens; 0 disables it
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token); 0 disables it
    stop: tuple[str, ...] = ()  # stop strings: a completion ends once its text contains one (it is kept)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether top-p, top-k or min-p cut the distribution that tokens are drawn from (the log-probs an engine
        reports stay the whole tempered distribution's: Rollout.sampling_logprobs)."""
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0

    @classmethod
    def from_config(cls, sampling, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingParams:
        """The parameters of a run's `sampling` section (grpo.config.SamplingConfig); `greedy` for evaluation
        (temperature 0, no truncation), `max_new_tokens` to override the section's."""
        if greedy:
            return cls(max_new_tokens=max_new_tokens or sampling.max_new_tokens, temperature=0.0,
                       stop=tuple(sampling.stop))
        return cls(
            max_new_tokens=max_new_tokens or sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            stop=tuple(sampling.stop),
        )


class LogprobKind(str, Enum):
    """What an engine's sampled log-probs are (`RolloutEngine.logprob_kind`)."""

    POLICY = "policy"  # the policy's own tempered distribution, same weights and dtype: pi_old up to rounding
    OTHER = "other"  # another model's: a copy in another dtype, or another kernel (vLLM)


@dataclass
class Rollout:
    """G completions for each of B prompts. Row n = b * G + g is sample g of prompt b.

    Completion tensors are right-padded; `completion_mask` marks the real tokens,
    including the final EOS token when one was sampled. In a multi-turn episode (grpo.envs) the completion is
    every turn after the prompt, the model's tokens and the environment's, and `action_mask` marks the model's:
    only those enter the loss, the KL, the entropy, the lengths and every normalizer (`model_mask`).
    """

    prompt_ids: list[list[int]]  # B prompts, unpadded token ids
    completion_ids: torch.Tensor  # [N, T] long, padded with the tokenizer's pad id
    completion_mask: torch.Tensor  # [N, T] bool
    truncated: torch.Tensor  # [N] bool: stopped by max_new_tokens (no EOS, no stop string)
    group_size: int  # G
    # [N, T] float32: log-prob of each sampled token under the sampler's tempered distribution over the
    # whole vocabulary, log softmax(logits / temperature), as the trainer computes pi_old: top-k / top-p /
    # min-p choose which tokens can be drawn, not the log-prob reported (renormalized over the kept tokens,
    # every ratio pi_old / pi_sampler would carry the kept probability mass; TRL issue #6789). Greedy
    # (temperature 0): temperature 1. 0 at padding. None when the engine cannot provide it.
    sampling_logprobs: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)  # engine's own timings / counters
    # [N, T] bool: the tokens the model sampled; the others (environment messages) only condition later turns.
    # None: every completion token is the model's (single-turn).
    action_mask: torch.Tensor | None = None
    episodes: list | None = None  # N grpo.envs.episodes.Episode records (multi-turn), else None

    @property
    def num_completions(self) -> int:  # N
        return self.completion_ids.shape[0]

    @property
    def model_mask(self) -> torch.Tensor:  # [N, T] bool: the model's own tokens
        return self.completion_mask if self.action_mask is None else self.action_mask

    @property
    def lengths(self) -> torch.Tensor:  # [N] long: the model's own tokens
        return self.model_mask.sum(dim=1)

    @property
    def spans(self) -> torch.Tensor:  # [N] long: every real completion token, the environment's included
        return self.completion_mask.sum(dim=1)


@dataclass
class TurnSample:
    """One model turn of one episode (`EpisodeSession.sample`)."""

    ids: list[int]  # the tokens sampled this turn, the EOS or the stop string's last token included when it ended so
    logprobs: list[float]  # the sampling log-prob of each (whole tempered distribution, as Rollout.sampling_logprobs)
    stopped: bool  # ended by EOS or a stop string; False: it reached its token limit


class EpisodeSession(Protocol):
    """Multi-turn sampling for B prompts x G episodes (N rows, row n = b * G + g), turn by turn (grpo.envs.episodes).

    An engine's `episodes(prompt_ids, group_size, seeds)` opens one. Turn k of row n draws its random numbers from
    its own stream, `turn_seeds(seeds, G, k)[n]` (one `torch.rand((T, 1))` stream per row), whatever else is in the
    batch: `engine.generate([transcript of row n], 1, params, seeds=[that seed])` draws the same numbers, which is
    how `grpo.rollout.session.TranscriptSession` samples (and how an engine's own session is tested)."""

    def sample(self, rows: list[int], params: SamplingParams, limits: list[int]) -> list[TurnSample]:
        """One model turn for each of `rows` (the live episodes), in one batch; row rows[i] samples at most
        limits[i] tokens (<= params.max_new_tokens)."""
        ...

    def extend(self, rows: list[int], tokens: list[list[int]]) -> None:
        """Append the environment's tokens to these rows' transcripts; they condition the rows' next turns."""
        ...

    def close(self) -> None: ...  # release what the session holds (caches)


def turn_seeds(seeds: list[int], group_size: int, turn: int) -> list[int]:
    """The N = len(seeds) * G row seeds of a multi-turn batch's turn `turn`: row b * G + g gets
    group_seed(seeds[b], g, turn)."""
    return [group_seed(s, g, turn) for s in seeds for g in range(group_size)]


class RolloutEngine(Protocol):
    """Samples completions from the policy.

    The trainer calls `sync_weights(model)` after every optimizer update (and grpo.resume after a resume):
    an engine that reads the policy's own tensors does nothing there; one holding a copy (a cast
    copy, a merged LoRA copy, vLLM) must refresh it, since `generate` samples from whatever it holds.
    """

    @classmethod
    def from_config(cls, sampling, model, tokenizer) -> RolloutEngine: ...  # sampling: SamplingConfig

    def logprob_kind(self, params: SamplingParams) -> LogprobKind: ...  # POLICY: usable as pi_old's

    def generate(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,  # used only to draw `seeds` when none are given
        seeds: list[int] | None = None,  # one per prompt: its group's random stream (see group_seed)
    ) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...

    def describe(self) -> str: ...  # one line for the run's log: which engine, and how it decodes

    def episodes(self, prompt_ids: list[list[int]], group_size: int, seeds: list[int] | None) -> EpisodeSession:
        ...  # multi-turn sampling (None seeds: greedy)


def group_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, e.g. (run seed, step, sampling round, global group index).

    Each group samples from its own stream, seeded by what identifies it in the run: the same group draws
    the same random numbers whatever else is in the batch, so the world size (which groups a rank holds)
    does not change what a run samples. The keys are mixed by numpy's SeedSequence (a hash), so nearby
    keys give unrelated streams."""
    import numpy as np

    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int(words[0]) << 31 ^ int(words[1])


def draw_seeds(generator: torch.Generator | None, count: int) -> list[int]:
    """`count` group seeds drawn from `generator` (torch's global RNG when None): for callers that pass one
    generator instead of group seeds."""
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def group_uniforms(seeds: list[int], group_size: int, steps: int) -> torch.Tensor:
    """[steps, N] float64 uniform draws in [0, 1), N = len(seeds) * G: column b * G + g is sample g of group
    b, drawn from group b's own stream (step-major, so step t takes the same numbers whatever T is)."""
    cols = [torch.rand((steps, group_size), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds]
    return torch.cat(cols, dim=1)


def stop_string_end(token_ids: list[int], tokenizer, stop: tuple[str, ...]) -> int | None:
    """Number of leading tokens up to and including the one that completes a stop string, or None."""
    if not stop:
        return None
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    if not any(s in text for s in stop):
        return None
    for end in range(1, len(token_ids) + 1):  # the shortest prefix that contains a stop string
        prefix = tokenizer.decode(token_ids[:end], skip_special_tokens=False)
        if any(s in prefix for s in stop):
            return end
    return None


def finish_completions(
    completion_ids: torch.Tensor,  # [N, T] raw sampled tokens, anything after the end
    eos_token_ids: set[int],
    pad_token_id: int,
    max_new_tokens: int,
    tokenizer=None,
    stop: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row at its first EOS or stop string; return (ids, mask, truncated).

    ids: [N, T] with everything after the end replaced by pad; mask: [N, T] bool
    (the EOS token itself counts); truncated: [N] bool, rows that ran to
    max_new_tokens without an EOS or a stop string.
    """
    n, t = completion_ids.shape
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= completion_ids == e
    ends = torch.full((n,), t, dtype=torch.long)  # [N] number of real tokens
    has_eos = is_eos.any(dim=1)
    ends[has_eos] = is_eos.float().argmax(dim=1)[has_eos] + 1
    stopped = has_eos.clone()
    if stop and tokenizer is not None:
        for row in range(n):
            cut = stop_string_end(completion_ids[row, : ends[row]].tolist(), tokenizer, stop)
            if cut is not None:
                ends[row] = cut
                stopped[row] = True
    mask = torch.arange(t).unsqueeze(0) < ends.unsqueeze(1)  # [N, T]
    ids = completion_ids.masked_fill(~mask, pad_token_id)
    truncated = ~stopped & (ends >= max_new_tokens)
    return ids, mask, truncated


def rollout_from_raw(
    prompt_ids: list[list[int]],
    raw: torch.Tensor,  # [N, T'] sampled ids as the sampler returned them, anything after the end
    logprobs: torch.Tensor,  # [N, T'] float32 sampling log-prob of each
    group_size: int,
    params: SamplingParams,
    eos_token_ids: set[int],
    pad_token_id: int,
    tokenizer,
    stats: dict[str, float] | None = None,
) -> Rollout:
    """The Rollout of an engine that samples whole rows first (generate, vLLM): each row cut at its first EOS
    or stop string (`finish_completions`), log-probs zeroed past the end."""
    completion_ids, mask, truncated = finish_completions(
        raw, eos_token_ids, pad_token_id, params.max_new_tokens, tokenizer, params.stop
    )
    return Rollout(
        prompt_ids=[list(p) for p in prompt_ids],
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
        group_size=group_size,
        sampling_logprobs=logprobs.float().masked_fill(~mask, 0.0),
        stats=dict(stats or {}),
    )


def select_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The rollout of the given groups (prompt indices), in that order."""
    g = rollout.group_size
    rows = torch.tensor([b * g + k for b in groups for k in range(g)], dtype=torch.long)
    return Rollout(
        prompt_ids=[rollout.prompt_ids[b] for b in groups],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        truncated=rollout.truncated[rows],
        group_size=g,
        sampling_logprobs=None if rollout.sampling_logprobs is None else rollout.sampling_logprobs[rows],
        stats=dict(rollout.stats),
        action_mask=None if rollout.action_mask is None else rollout.action_mask[rows],
        episodes=None if rollout.episodes is None else [rollout.episodes[i] for i in rows.tolist()],
    )


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of all groups, completions right-padded to the longest; numeric stats are summed."""
    t = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, value) -> torch.Tensor:  # [n, t_r] -> [n, t]
        return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

    stats: dict[str, float] = {}
    for r in rollouts:
        for k, v in r.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    logprobs = [r.sampling_logprobs for r in rollouts]
    multi_turn = any(r.action_mask is not None for r in rollouts)
    episodes = [e for r in rollouts for e in (r.episodes or [None] * r.num_completions)]
    return Rollout(
        prompt_ids=[p for r in rollouts for p in r.prompt_ids],
        completion_ids=torch.cat([pad(r.completion_ids, pad_token_id) for r in rollouts]),
        completion_mask=torch.cat([pad(r.completion_mask, False) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        group_size=rollouts[0].group_size,
        sampling_logprobs=None if any(x is None for x in logprobs) else torch.cat([pad(x, 0.0) for x in logprobs]),
        stats=stats,
        action_mask=torch.cat([pad(r.model_mask, False) for r in rollouts]) if multi_turn else None,
        episodes=episodes if any(e is not None for e in episodes) else None,
    )
