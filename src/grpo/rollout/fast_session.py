"""The fast engine's multi-turn session: each episode's KV cache is extended turn by turn, never prefilled again.

`TranscriptSession` (rollout/session.py) samples each turn from every live episode's whole transcript, so a turn
prefills the prompt and all the turns before it again. `FastSession` keeps the caches between turns:

    prompts                 prefilled once, each shared by its G episodes (as in FastEngine.generate)
    a turn (sample)         the live episodes decode in one batch; an episode whose turn ends leaves the decode
                            batch (it is moved behind it) but keeps its cache for its next turn
    the environment's       queued by `extend`; at the episode's next turn they run in one forward with the last
    tokens (extend)         token of its previous turn: a prefill of those tokens only, q tokens per row against
                            the row's cache (left padded to the longest chunk of the batch)

The live episodes are the rows of one cache with one time axis (through the FusedDecoder, the cache of every
token after the prompt, the prompts being read from their group's prefill; through the model's forward, the
whole transcript). Rows are at different lengths after a turn: `bias` [R, C] is each row's additive mask over the
time axis, 0 where the row holds one of its tokens, the dtype's minimum at a hole (a position written while the
row was not in the batch, or padding of a chunk). At the start of each turn the cache keeps only the episodes of
the turn (the others have ended) and each row's tokens are moved to the front (`KVCache.gather`): a live episode
holds its own tokens' keys and values plus padding up to the longest live episode, whatever the number of turns.
Keys are stored rotated at their own positions (RoPE), so moving them along the time axis changes nothing.

Random numbers, limits, EOS and stop strings are TranscriptSession's: turn k of row n draws
`torch.rand((T, 1))` from `turn_seeds(seeds, G, k)[n]`, a turn ends at EOS, a stop string (both kept) or the
row's limit, greedy when params.greedy; tests/test_episode_session.py checks the two sessions sample the same.

Vocabulary: B prompts, G episodes per prompt, N = B*G episodes, R rows in the cache, n rows in a call, q tokens
per row in a chunk, L positions written so far, C positions allocated, V vocab.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from grpo.rollout.base import SamplingParams, TurnSample, group_seed, group_uniforms
from grpo.rollout.decoder import FusedDecoder

# The session's caches grow without a fixed cap (the model's context bounds each episode).
UNBOUNDED = 1 << 40


def compaction(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L] bool (a row's tokens) -> (positions [R, L'] long, counts [R] long), L' = the most tokens of a row:
    row r's token positions in order, then (for the rows with fewer) hole positions to pad it to L'."""
    R, L = valid.shape
    counts = valid.sum(dim=1)  # [R]
    key = (~valid).long() * L + torch.arange(L, device=valid.device)  # [R, L] tokens first, each kept in order
    width = int(counts.max()) if R else 0
    return key.argsort(dim=1)[:, :width], counts


def chunk_mask(row_bias: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The additive mask of a chunk of q new tokens per row: [n, 1, q, L+q].

    row_bias: [n, L] each row's mask over the cache so far; real: [n, q] bool, the chunk's tokens (False: padding).
    Query i of a row attends the row's cache and the chunk's real tokens up to itself (causal)."""
    n, q = real.shape
    neg = torch.finfo(row_bias.dtype).min
    causal = torch.ones(q, q, dtype=torch.bool, device=real.device).tril()  # [q, q] key j <= query i
    sees = causal[None] & real[:, None, :]  # [n, q, q]
    chunk = torch.zeros(sees.shape, dtype=row_bias.dtype, device=real.device).masked_fill_(~sees, neg)
    return torch.cat([row_bias[:, None, :].expand(n, q, -1), chunk], dim=2)[:, None]  # [n, 1, q, L+q]


class FastSession:
    """An EpisodeSession (grpo.rollout.base) of FastEngine `engine`: B prompts x G episodes, N rows (module doc)."""

    def __init__(self, engine, prompt_ids: list[list[int]], group_size: int, seeds: list[int] | None):
        engine._check(prompt_ids, group_size, SamplingParams(max_new_tokens=1))
        self.engine, self.group_size, self.seeds = engine, group_size, seeds
        self.device = next(engine.runner.parameters()).device
        self.fused = engine._use_fused(self.device)
        N = len(prompt_ids) * group_size
        self.order = torch.arange(N, device=self.device)  # [R] the episode of each cache row
        self.pos = torch.tensor([len(p) for p in prompt_ids], device=self.device).repeat_interleave(group_size)  # [N]
        self.pending: list[list[int]] = [[] for _ in range(N)]  # tokens of each episode not run yet
        self.turns = [0] * N
        self.ended = [False] * N
        with engine._running(N, self.fused) as use_onednn:
            cache, prompt_bias, logits, _ = engine._prefill(prompt_ids, group_size, UNBOUNDED, self.device,
                                                            shared=self.fused)
            self.first_logits = logits  # [N, V] each episode's first token, from its prompt
            if self.fused:
                self.decoder = FusedDecoder(engine.runner, N, use_onednn, engine._prepack)
                self.decoder.start(cache, prompt_bias, group_size, UNBOUNDED)
                self.cache = self.decoder.cache  # the tokens after the prompts
                self.bias = torch.zeros((N, 0), dtype=torch.float32, device=self.device)  # [R, C]
            else:
                self.decoder = None
                cache.repeat_rows(len(prompt_ids), group_size)  # the whole transcript of each row
                self.cache = cache
                self.bias = prompt_bias.repeat_interleave(group_size, dim=0)  # [R, C]: the prompts' padding masked

    # -- the protocol ---------------------------------------------------------------------------------------

    def sample(self, rows: list[int], params: SamplingParams, limits: list[int]) -> list[TurnSample]:
        """One turn of each of `rows`, in one batch; the episodes not in `rows` have ended (their caches go)."""
        if not rows:
            return []
        self._check(rows, params, limits)
        engine, n = self.engine, len(rows)
        T = max(limits)
        g = self.group_size
        uniforms = None if params.greedy else group_uniforms(
            [group_seed(self.seeds[e // g], e % g, self.turns[e]) for e in rows], 1, T).to(self.device)  # [T, n]
        with engine._running(n, self.fused), engine.decode_attention():
            self._keep(rows)
            logits = self._run_pending(rows)  # [n, V]
            start = self.cache.length
            decode = _TurnDecode(self, n)
            ids, logprobs, ends, stopped, _ = engine._decode(
                decode, logits, self.pos[self.order], replace(params, max_new_tokens=T), uniforms,
                torch.tensor(limits, device=self.device))
            self._end_turn(rows, ids, ends, decode, start)
        self.first_logits = None  # every episode still live has had its first turn
        ids, logprobs, ends, stopped = (x.cpu() for x in (ids, logprobs, ends, stopped))
        return [TurnSample(ids[i, : ends[i]].tolist(), logprobs[i, : ends[i]].tolist(), bool(stopped[i]))
                for i in range(n)]

    def extend(self, rows: list[int], tokens: list[list[int]]) -> None:
        """Queue the environment's tokens: they run, in one forward per turn, at the rows' next turn."""
        for e, ids in zip(rows, tokens):
            if self.ended[e]:
                raise ValueError(f"episode {e} has ended (it was left out of a turn): it cannot be extended")
            self.pending[e] += [int(t) for t in ids]

    def close(self) -> None:
        self.decoder = self.cache = self.bias = self.first_logits = None

    # -- inside a turn --------------------------------------------------------------------------------------

    def _check(self, rows: list[int], params: SamplingParams, limits: list[int]) -> None:
        if len(limits) != len(rows) or len(set(rows)) != len(rows):
            raise ValueError(f"sample needs one limit per row and distinct rows; got rows {rows}, limits {limits}")
        for e, limit in zip(rows, limits):
            if self.ended[e]:
                raise ValueError(f"episode {e} has ended (it was left out of a turn): it cannot be sampled")
            if not 1 <= limit <= params.max_new_tokens:
                raise ValueError(f"episode {e}: limit {limit} is not in [1, max_new_tokens={params.max_new_tokens}]")
        longest = max(int(self.pos[e]) + len(self.pending[e]) + limit for e, limit in zip(rows, limits))
        for bound, what in self.engine.position_bounds():
            if longest > bound:
                raise ValueError(f"an episode needs {longest} positions for this turn, more than the model's {what} "
                                 f"of {bound}: lower environment.max_tokens or sampling.max_new_tokens")

    def _keep(self, rows: list[int]) -> None:
        """Keep only the episodes `rows` in the cache, row i = rows[i], each row's tokens moved to the front."""
        episodes = torch.tensor(rows, device=self.device)
        for e in set(self.order.tolist()) - set(rows):
            self.ended[e] = True
        row_of = torch.full((len(self.pending),), -1, dtype=torch.long, device=self.device)
        row_of[self.order] = torch.arange(self.order.numel(), device=self.device)
        source = row_of[episodes]  # [n] the cache row of each
        L = self.cache.length
        positions, counts = compaction(self.bias[source, :L] == 0)  # [n, L'], [n]
        in_place = source.numel() == self.order.numel() and bool((source == torch.arange(len(rows),
                                                                                          device=self.device)).all())
        if in_place and bool((counts == L).all()):  # no episode ended, no row has a hole
            if self.decoder is not None:
                self.decoder.reindex(source)  # every row decodes (the last turn may have left fewer live)
            return
        self.cache.gather(source, positions)
        width = self.cache.capacity
        self.bias = torch.zeros((len(rows), width), dtype=self.bias.dtype, device=self.device)
        self.bias.masked_fill_(torch.arange(width, device=self.device) >= counts[:, None], self._neg)
        self.order = episodes
        if self.decoder is not None:
            self.decoder.reindex(source)

    @property
    def _neg(self) -> float:
        return torch.finfo(self.bias.dtype).min

    def _reserve(self, length: int) -> None:
        """Room for `length` positions in the cache and in `bias` (new positions: holes until written)."""
        self.cache.reserve(length)
        if self.bias.shape[1] < length:
            grown = self.bias.new_full((self.bias.shape[0], max(length, self.cache.capacity)), self._neg)
            grown[:, : self.bias.shape[1]] = self.bias
            self.bias = grown

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[n, q] (or [n]: one) tokens and positions of the first n rows, [n, 1, q, L+q] additive mask -> [n, V]
        logits of each row's last token; their keys and values are written at [L, L+q)."""
        if self.decoder is not None:
            return self.decoder(tokens, positions, own_bias=mask)
        if tokens.dim() == 1:
            tokens, positions = tokens[:, None], positions[:, None]
        logits = self.engine._forward(tokens, positions, mask, self.cache)
        self.cache.advance(tokens.shape[1])
        return logits

    def _run_pending(self, rows: list[int]) -> torch.Tensor:
        """Run each row's queued tokens (its previous turn's last token, the environment's) in one forward, left
        padded to the longest; -> [n, V] the logits of each row's next token."""
        n, pad = len(rows), self.engine.pad_id
        counts = torch.tensor([len(self.pending[e]) for e in rows], device=self.device)  # [n]
        q = int(counts.max())
        if q == 0:  # every row's first turn: its prompt's logits
            return self.first_logits[self.order]
        tokens = torch.tensor([[pad] * (q - len(self.pending[e])) + self.pending[e] for e in rows],
                              device=self.device)  # [n, q]
        offsets = torch.arange(q, device=self.device) - (q - counts)[:, None]  # [n, q] < 0 at padding
        real = offsets >= 0
        positions = (self.pos[self.order][:, None] + offsets).clamp(min=0)  # [n, q]
        L = self.cache.length
        self._reserve(L + q)
        self.bias[:n, L : L + q] = torch.zeros_like(real, dtype=self.bias.dtype).masked_fill_(~real, self._neg)
        logits = self._forward(tokens, positions, chunk_mask(self.bias[:n, :L], real))
        if bool((counts == 0).any()):  # rows with nothing queued (turn 0 of a row beside others): the prompt's
            logits[counts == 0] = self.first_logits[self.order[counts == 0]]
        self.pos[self.order] += counts
        for e in rows:
            self.pending[e] = []
        return logits

    def _end_turn(self, rows, ids, ends, decode: _TurnDecode, start: int) -> None:
        """After the turn's decode: each row keeps the keys of its turn's tokens but the last (queued for its next
        turn), the rest of what was written in its row since `start` becomes holes."""
        kept = torch.minimum(decode.fed, ends - 1)  # [n] per turn row: tokens whose keys stay
        at = decode.at  # [R] the turn row of each cache row
        L = self.cache.length
        hole = torch.arange(start, L, device=self.device)[None] >= (start + kept[at])[:, None]  # [R, L-start]
        self.bias[:, start:L].masked_fill_(hole, self._neg)
        self.pos[rows] += kept.to(self.pos.dtype)  # rows = the turn rows' episodes, in turn order
        last = ids.gather(1, (ends - 1).clamp(min=0)[:, None]).squeeze(1).tolist()  # [n] each turn's last token
        for i, e in enumerate(rows):
            self.pending[e] = [last[i]]
            self.turns[e] += 1


class _TurnDecode:
    """The decode steps of a turn for FastEngine._decode: the live rows are the first `live` rows of the cache;
    a row whose turn ends is moved behind them and keeps its cache (FastSession)."""

    def __init__(self, session: FastSession, n: int):
        self.session, self.live = session, n
        self.at = torch.arange(n, device=session.device)  # [R] the turn row of each cache row
        self.fed = torch.zeros(n, dtype=torch.long, device=session.device)  # [n] tokens fed per turn row

    def keep_rows(self, index: torch.Tensor) -> None:
        """Rows index ([m] into the live rows) decode on, moved to the front in that order; the others follow."""
        s, R = self.session, self.session.order.numel()
        others = torch.ones(self.live, dtype=torch.bool, device=index.device)
        others[index] = False
        perm = torch.cat([index, others.nonzero().squeeze(1), torch.arange(self.live, R, device=index.device)])
        if s.decoder is not None:
            s.decoder.keep_rows(perm, live=index.numel())
        else:
            s.cache.keep_rows(perm)
        s.bias, s.order, self.at = s.bias[perm], s.order[perm], self.at[perm]
        self.live = index.numel()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[m] tokens and positions of the live rows -> [m, V] next-token logits."""
        s, m = self.session, tokens.shape[0]
        L = s.cache.length
        s._reserve(L + 1)
        s.bias[:m, L] = 0.0  # the token fed now is attended from now on
        self.fed[self.at[:m]] += 1
        return s._forward(tokens, positions, s.bias[:m, None, None, : L + 1])
