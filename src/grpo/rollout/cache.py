"""The KV cache the fast engine decodes with: written in place, grown by blocks, holding only the live rows.

Vocabulary: rows of the batch, kv_heads, head_dim, capacity = positions allocated, length = positions written.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def fill_holes(ended: torch.Tensor) -> torch.Tensor:
    """The rows to keep when the rows `ended` ([n] bool) leave the batch, in the order that moves fewest:
    [m] long, the old row that goes to place j. A kept row j < m stays where it is; the place of each
    ended row j < m is taken by a kept row from the tail (j >= m). E.g. ended = [0, 1, 0, 0, 1, 0] ->
    [0, 5, 2, 3]: one row moves, where keeping the order would move three (in a cache: every live row
    behind the first hole)."""
    keep = (~ended).nonzero().squeeze(1)  # [m] ascending
    m = keep.numel()
    index = torch.arange(m, device=ended.device)
    index[ended[:m]] = keep[keep >= m]  # as many holes before m as kept rows from m on
    return index


class _CacheLayer(CacheLayerMixin):
    """Keys and values of one attention layer: [rows, kv_heads, capacity, head_dim], written in place."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: KVCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, capacity = self.owner.max_rows, self.owner.capacity
        self.device = key_states.device
        self.keys = key_states.new_zeros((rows, key_states.shape[1], capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((rows, value_states.shape[1], capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the new [n, kv_heads, q, head_dim] states at the cache's length; return all [n, kv_heads, L+q, hd]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        r, n, q, start = self.owner.row_start, key_states.shape[0], key_states.shape[2], self.owner.length
        self.keys[r : r + n, :, start : start + q] = key_states
        self.values[r : r + n, :, start : start + q] = value_states
        return self.keys[r : r + n, :, : start + q], self.values[r : r + n, :, : start + q]

    def reallocate(self, rows: int, capacity: int, length: int) -> None:
        """New buffers of [rows, kv_heads, capacity, head_dim] holding the first `rows` rows up to `length`."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((rows, old.shape[1], capacity, old.shape[3]))
            new[:, :, :length] = old[:rows, :, :length]
            setattr(self, name, new)

    def gather(self, rows: torch.Tensor, positions: torch.Tensor, capacity: int) -> None:
        """New buffers of [m, kv_heads, capacity, head_dim]: row j holds old row rows[j]'s positions positions[j]
        ([m] and [m, L'] long), in that order, at positions [0, L')."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((rows.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : positions.shape[1]] = old[rows[:, None], :, positions].transpose(1, 2)  # [m, L', K, hd] read
            setattr(self, name, new)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.max_len


class KVCache(Cache):
    """A KV cache for a batch whose rows share one time axis (prompts are left padded), written in place.

    The model's attention layers call `update`, which writes the rows from `row_start` on at position
    `length`. The engine's verbs: `reserve(L)` before a forward that fills positions up to L,
    `advance(q)` after a forward of q tokens, `repeat_rows(b, G)` to give each of b prefilled prompts
    its G samples, `keep_rows(idx)` to drop finished rows (in `fill_holes`' order, few rows move).
    Capacity grows by `BLOCK` positions at a time and a growth also drops the rows that finished, so
    memory follows the live rows instead of N x (P + max_new_tokens); there is no concatenation per step.
    """

    BLOCK = 32  # positions added at each growth

    def __init__(self, num_layers: int, max_rows: int, max_len: int):
        super().__init__(layers=[])
        self.max_rows, self.max_len = max_rows, max_len
        self.rows = max_rows  # rows in use
        self.capacity = 0  # positions allocated
        self.length = 0  # positions written so far (the same for every row)
        self.row_start = 0  # the first row the next forward writes (prefill runs in chunks of prompts)
        self.layers = [_CacheLayer(self) for _ in range(num_layers)]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        self.capacity = min(self.max_len, length + self.BLOCK)
        for layer in self.layers:
            if layer.is_initialized:
                layer.reallocate(self.rows, self.capacity, self.length)

    def advance(self, q: int) -> None:
        self.length += q

    def repeat_rows(self, rows: int, repeats: int) -> None:
        """Rows [0, rows) become rows [0, rows*repeats): row i is copied to rows i*repeats ... (i+1)*repeats-1."""
        for layer in self.layers:
            if layer.is_initialized:
                for buf in (layer.keys, layer.values):
                    filled = buf[:rows, :, : self.length]
                    buf[: rows * repeats, :, : self.length] = filled.repeat_interleave(repeats, dim=0)
        self.rows = rows * repeats

    def gather(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the rows `rows` ([m] long), row j holding old row rows[j]'s positions positions[j] ([m, L'] long,
        each < length) in that order: the cache becomes m rows of L' positions, in new buffers of L' + BLOCK
        positions. A multi-turn session drops the positions that hold no token of a row this way
        (grpo.rollout.fast_session)."""
        m, length = positions.shape
        self.capacity = min(self.max_len, length + self.BLOCK)
        for layer in self.layers:
            if layer.is_initialized:
                layer.gather(rows, positions, self.capacity)
        self.rows, self.length = m, length

    def keep_rows(self, index: torch.Tensor) -> None:
        """Row j becomes old row index[j] ([m] long, distinct), for j < m; the rows after m are dropped.

        Only the rows that move are copied: with `fill_holes`' order, the few that fill the places of the
        rows that ended, not every live row behind them."""
        m = index.numel()
        moved = (index != torch.arange(m, device=index.device)).nonzero().squeeze(1)  # [k] rows whose place changes
        if moved.numel():
            source = index[moved]
            for layer in self.layers:
                if layer.is_initialized:
                    for buf in (layer.keys, layer.values):
                        buf[moved, :, : self.length] = buf[source, :, : self.length]  # read fully before written
        self.rows = m
