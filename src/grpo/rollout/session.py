"""Multi-turn sampling through any engine's `generate`: each turn samples from every live episode's whole
transcript (prompt, turns so far), so each turn prefills the transcript again. It is the session of the `hf` and
`vllm` engines (vLLM's prefix caching reuses the transcript's cache) and the reference the `fast` engine's own
session (which extends each episode's KV cache instead) is tested against.
"""

from __future__ import annotations

from dataclasses import replace

from grpo.rollout.base import SamplingParams, TurnSample, group_seed


class TranscriptSession:
    """An EpisodeSession (grpo.rollout.base) over `engine.generate`: B prompts x G episodes, N rows."""

    def __init__(self, engine, prompt_ids: list[list[int]], group_size: int, seeds: list[int] | None):
        self.engine, self.group_size, self.seeds = engine, group_size, seeds
        self.transcripts = [list(p) for p in prompt_ids for _ in range(group_size)]  # N token lists
        self.turns = [0] * len(self.transcripts)  # the next turn of each row

    def sample(self, rows: list[int], params: SamplingParams, limits: list[int]) -> list[TurnSample]:
        """One turn for each of `rows`: one generate call, one "group" of 1 per row under the row's turn seed."""
        if not rows:
            return []
        g = self.group_size
        seeds = None if params.greedy else [group_seed(self.seeds[n // g], n % g, self.turns[n]) for n in rows]
        rollout = self.engine.generate([self.transcripts[n] for n in rows], 1,
                                       replace(params, max_new_tokens=max(limits)), seeds=seeds)
        out = []
        for i, (n, limit) in enumerate(zip(rows, limits)):
            length, stopped = int(rollout.completion_mask[i].sum()), not bool(rollout.truncated[i])
            if length > limit:  # sampled past this row's own limit: cut there
                length, stopped = limit, False
            ids = rollout.completion_ids[i, :length].tolist()
            logprobs = rollout.sampling_logprobs[i, :length].tolist() if rollout.sampling_logprobs is not None \
                else [0.0] * length
            self.transcripts[n] += ids
            self.turns[n] += 1
            out.append(TurnSample(ids, logprobs, stopped))
        return out

    def extend(self, rows: list[int], tokens: list[list[int]]) -> None:
        for n, ids in zip(rows, tokens):
            self.transcripts[n] += list(ids)

    def close(self) -> None:
        self.transcripts = []
