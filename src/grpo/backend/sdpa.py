"""One place that swaps transformers' `sdpa` attention entry for the length of a block: float32 attention under a
CPU bfloat16 autocast (grpo.backend.plain) and packed sequences (grpo.backend.packed) both wrap it this way, and
nest."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial


@contextmanager
def wrapping_sdpa(wrapper, *args):
    """Within this block transformers' `sdpa` entry is `partial(wrapper, inner, *args)`, `inner` the entry found
    (transformers' own, a user's, or an enclosing block's); put back as it was on exit (a local entry, or none)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as attention

    inner = attention["sdpa"]
    local = getattr(attention, "_local_mapping", {}).get("sdpa")
    attention["sdpa"] = partial(wrapper, inner, *args)
    try:
        yield
    finally:
        if local is None:
            del attention["sdpa"]
        else:
            attention["sdpa"] = local
