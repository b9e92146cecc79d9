"""Our rollout engine: batched KV-cache sampling, each prompt prefilled once and shared by its G samples.

What `model.generate` does for GRPO, and what this engine does instead:
- each prompt is repeated G times and prefilled G times   -> B prompts prefilled once; each prompt's cache is
                                                             read once per group by its G samples (FusedDecoder),
                                                             or copied to them (through the model's forward)
- the DynamicCache grows by concatenation at every step    -> a cache written in place, grown by blocks of
                                                             positions, and holding only the live rows
- finished rows keep decoding until the last row ends       -> finished rows leave the batch (it is compacted)
- logits are computed for every prompt position at prefill  -> only for the last one
- a chain of logits processors over the whole vocabulary    -> a few small tensor functions, only those enabled

Multi-turn episodes (`episodes`) keep each episode's cache between turns and run only the environment's new
tokens through the model (grpo.rollout.fast_session.FastSession).

It prefills through the model's own forward, handing it a cache object and a 4D additive attention mask,
and decodes Llama-family models with `grpo.rollout.decoder.FusedDecoder` (a few ops per layer on fused
weights), any other `transformers` causal LM through its forward again. By default
it samples with the model itself, so weight updates are seen at once; with `dtype=` it samples with a
cast copy that it refreshes at every call (see FastEngine).

Vocabulary: B prompts, G samples per prompt, N = B*G rows, n rows still decoding, P padded prompt
width, T max_new_tokens, V vocab, L cache length so far.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager, nullcontext

import torch

from grpo.backend import onednn
from grpo.core.logprobs import left_pad
from grpo.models import is_lora, merged_copy, pad_token_id, refresh_merged
from grpo.rollout.base import (
    LogprobKind,
    Rollout,
    SamplingParams,
    draw_seeds,
    group_uniforms,
    stop_string_end,
)
from grpo.rollout.cache import KVCache, fill_holes
from grpo.rollout.decoder import FusedDecoder, unsupported
from grpo.rollout.hf import eos_token_ids

# Attention implementations that take a ready 4D additive mask [n, 1, q, L].
MASKED_ATTENTION = ("sdpa", "eager")
# Prefill runs the prompts in chunks of at most this many tokens and mask elements per forward.
PREFILL_TOKENS = 8192
PREFILL_MASK_ELEMENTS = 2**24


# -- sampling: pure tensor functions ---------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor,  # [n, V] float32 raw logits
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Logits of the distribution to sample from: [n, V], scaled by 1/temperature, -inf outside the kept set.

    Order as in `transformers` generate: temperature, top-k, top-p (Holtzman et al. 2019), min-p
    (Nguyen et al. 2024). Each filter keeps at least the most likely token.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [n, 1] k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [n, V] probability of the tokens ranked above
        drop_sorted = mass_above >= top_p
        drop_sorted[:, 0] = False  # the most likely token always stays (even at top_p = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)  # [n, V]
        floor = min(min_p, 1.0) * probs.max(dim=-1, keepdim=True).values  # [n, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor,  # [n, V] float32, the filtered logits (-inf for dropped tokens)
    uniform: torch.Tensor,  # [n] float64 in [0, 1): one draw per row
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits), by inverting its CDF at `uniform`, and its log-prob.

    Returns ([n] long, [n] float32). One random number per row (torch.multinomial draws one per
    vocabulary entry: ~10 ms a step on CPU at 16 x 49152), and the CDF in two levels, over blocks of
    `block` tokens and then inside the chosen block, accumulated in float64; the clamps below keep the
    pick on a token with non-zero probability whatever the rounding. The probabilities come from one
    softmax kernel (2.5x faster on CPU than max, subtract and exp at 64 x 49152); a sampled token's
    probability is never 0, so its log is its log-prob to float32 rounding.
    """
    n, V = logits.shape
    weights = logits.softmax(dim=-1)  # [n, V]
    if V % block:
        weights = torch.nn.functional.pad(weights, (0, block - V % block))
    blocks = weights.view(n, -1, block)  # [n, V/block, block]
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [n, V/block] (sum(dtype=float64) is ~50x slower)
    total = block_cdf[:, -1:].contiguous()  # [n, 1] normaliser of `weights`
    target = uniform.unsqueeze(1) * total  # [n, 1] a point of the CDF
    b = torch.searchsorted(block_cdf, target, right=True)  # [n, 1] the first block whose CDF passes the target
    b = torch.minimum(b, torch.searchsorted(block_cdf, total))  # never past the last block with mass
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))  # [n, 1]
    inner_cdf = blocks.gather(1, b.unsqueeze(2).expand(n, 1, block)).squeeze(1).double().cumsum(dim=-1)  # [n, block]
    j = torch.searchsorted(inner_cdf, target - before, right=True)  # [n, 1] position inside the block
    j = torch.minimum(j, torch.searchsorted(inner_cdf, inner_cdf[:, -1:].contiguous()))  # a token with mass
    tokens = b * block + j  # [n, 1]
    logprobs = weights.gather(1, tokens).log() - total.log().float()  # [n, 1] log of the token's share of the total
    return tokens.squeeze(1), logprobs.squeeze(1)


def greedy_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely token per row and its log-prob under softmax(logits) (temperature 1): ([n], [n])."""
    tokens = logits.argmax(dim=-1, keepdim=True)  # [n, 1]
    logprobs = logits.gather(1, tokens) - logits.logsumexp(dim=-1, keepdim=True)  # [n, 1]
    return tokens.squeeze(1), logprobs.squeeze(1)


def tempered_logprobs(logits: torch.Tensor, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """[n, V] raw logits, [n] tokens -> [n] log softmax(logits / temperature) of each token, over the whole
    vocabulary (what the trainer computes for the same token)."""
    if temperature != 1.0:
        logits = logits / temperature  # as filter_logits scales them
    return (logits.gather(1, tokens.unsqueeze(1)) - logits.logsumexp(dim=-1, keepdim=True)).squeeze(1)


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, V] raw logits, [n] uniform draws -> (tokens [n], log-probs [n]): each token drawn as `params` asks, its
    log-prob under the tempered distribution over the whole vocabulary, also where top-k / top-p / min-p picked
    it from a part of it (grpo.rollout.base.Rollout.sampling_logprobs)."""
    logits = logits.float()
    if params.greedy:
        return greedy_from_logits(logits)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    tokens, logprobs = sample_from_logits(filtered, uniform)
    if params.truncates:  # sample_from_logits's are of the kept part, renormalized
        logprobs = tempered_logprobs(logits, params.temperature, tokens)
    return tokens, logprobs


# -- the engine -------------------------------------------------------------------------------------


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _context_length(model) -> int | None:
    return getattr(_text_config(model), "max_position_embeddings", None)


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, or None when every layer attends to all."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if any("sliding" in t for t in layer_types) else None
    return window if getattr(config, "use_sliding_window", True) else None


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(names)}")
    return names[dtype]


def _cast_copy(model, dtype: torch.dtype):
    """A frozen copy of `model` whose parameters are in `dtype` (buffers, e.g. rotary frequencies, stay as they are).

    The parameters are cast straight into the copy (through deepcopy's memo), never copied at full size;
    tied parameters stay tied.
    """
    import copy

    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def _same_layout(copy, model) -> bool:
    """Whether `copy` can take `model`'s weights in place: the same parameter shapes, on the same device."""
    pa, pb = list(copy.parameters()), list(model.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and x.device == y.device for x, y in zip(pa, pb))


def _decode_attention(device: torch.device, dtype: torch.dtype):
    """The SDPA kernel for decode steps (one query per row): in float32 on CPU the plain math one, ~5-7%
    faster per generation than the flash kernel at 16-64 rows (~200 us a call there for a single query);
    elsewhere (other dtypes not measured) SDPA's own choice."""
    if device.type != "cpu" or dtype != torch.float32:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class FastEngine:
    """Batched KV-cache sampler; each prompt is prefilled once and its cache shared by its G samples.

    Options:
      dtype: sample with a copy of the weights cast to this dtype ("bfloat16", "float16", "float32"),
        refreshed from the model at the start of every `generate` (~one read of the weights). None
        (default): sample with the model itself, in its dtype. On a CPU with AVX512-BF16, a decode
        step's bfloat16 matmuls run ~1.7x faster than float32 (benchmarks/RESULTS_generate.md); the
        sampling log-probs are then those of the bfloat16 copy (the trainer recomputes the policy's own),
        and the copy costs half the fp32 weights' memory. The fused decoder's attention and completion
        cache stay in float32.
        For a LoRA (peft) policy the copy is the plain model with the adapters merged into its weights
        (only the adapted layers are recomputed at a refresh): decoding skips the adapters' extra matmuls.
        In the policy's own dtype that copy's log-probs are the policy's up to rounding.
      onednn: run the Linear layers through oneDNN's linear kernel, on the model's own weights; None
        (default): on for float32 and bfloat16 on CPU. For float32, PyTorch's default (MKL) kernel is
        ~1.7x slower at decode batch sizes (a few to a few dozen rows); for bfloat16, PyTorch copies
        the whole lm_head weight when its input is a strided slice (the last prompt position at
        prefill): 260 ms against 4 ms. Results agree to rounding.
      prepack: make one copy of the Linear weights at the start of each `generate`, shaped for the
        batch: with the fused decoder, q|k|v and gate|up concatenated and (with oneDNN) every weight
        reordered into oneDNN's blocked layout; through the model's forward, the reordering only
        (`grpo.onednn.packed`). ~1.3x faster sampling on CPU for ~0.1 s of copying; the copy is
        released after the call. False: no copy of the weights.
      fused: decode through `grpo.rollout.decoder.FusedDecoder` (Llama, Mistral, Qwen2: a few ops per layer,
        each prompt's cache shared by its G rows) instead of the model's forward; prefill always runs the
        model's forward. None (default): on CPU when the model is supported; True: required (an error when
        the model is not supported); False: never. With `prepack` the decoder's fused, reordered weights are
        the one copy; without it the decoder reads the model's own weights.

    `from_config` builds it from the run's `sampling` section (dtype, prepack, fused).
    """

    name = "fast"

    def __init__(
        self,
        model,
        tokenizer,
        dtype: str | torch.dtype | None = None,
        onednn: bool | None = None,
        prepack: bool = True,
        fused: bool | None = None,
    ):
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if attn not in MASKED_ATTENTION:
            raise ValueError(
                f"FastEngine needs an attention implementation that takes a 4D mask ({', '.join(MASKED_ATTENTION)}); "
                f"this model uses {attn!r}: load it with attn_implementation='sdpa', or use the 'hf' engine"
            )
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
        params = inspect.signature(base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._dtype = _as_dtype(dtype)
        self._onednn = onednn
        self._prepack = prepack
        self._fused = fused
        if fused:
            reason = unsupported(model)
            if reason is not None:
                raise ValueError(f"fused=True: {reason}; use fused=None to decode such models through their forward")
        self.model = model  # the policy: its weights are the ones sampled from
        self.runner = model  # what runs: the policy itself, or a copy of it in `dtype`
        self._merged: list | None = None  # LoRA: (merged Linear, LoRA layer) pairs of a merged copy
        self._merged_from = None  # the peft model that copy was made from
        self.sync_weights(model)

    @classmethod
    def from_config(cls, sampling, model, tokenizer) -> FastEngine:
        """The engine a run's `sampling` section (grpo.config.SamplingConfig) asks for."""
        return cls(model, tokenizer, dtype=sampling.dtype, prepack=sampling.prepack,
                   fused=None if sampling.fused else False)

    def logprob_kind(self, params: SamplingParams) -> LogprobKind:
        """POLICY when it samples with the policy itself, or with a merged LoRA copy in the policy's dtype (its
        log-probs are the tempered distribution's over the whole vocabulary, also under top-p / top-k / min-p);
        OTHER with a copy cast to another dtype."""
        same_dtype = next(self.runner.parameters()).dtype == next(self.model.parameters()).dtype
        exact = self.runner is self.model or (self._merged is not None and same_dtype)
        return LogprobKind.POLICY if exact else LogprobKind.OTHER

    def sync_weights(self, model) -> None:
        """Sample from `model` from now on; with a `dtype` copy, refresh the copy's weights now."""
        self.model = model
        model_dtype = next(model.parameters()).dtype
        if self._dtype is not None and is_lora(model):  # LoRA: a merged copy
            if self._merged is None or self._merged_from is not model:
                self.runner, self._merged = merged_copy(model, self._dtype)
                self._merged_from = model
            refresh_merged(self._merged)
            return
        self._merged = self._merged_from = None
        if self._dtype is None or self._dtype == model_dtype:
            self.runner = model
            return
        if self.runner is model or not _same_layout(self.runner, model):
            self.runner = _cast_copy(model, self._dtype)
        with torch.no_grad():
            for dst, src in zip(self.runner.parameters(), model.parameters()):
                dst.copy_(src)

    def generate(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """G samples for each prompt; group b draws its random numbers from seeds[b] (or, without seeds, from
        a seed drawn from `generator`), one per row and step, whatever else is in the batch."""
        self._check(prompt_ids, group_size, params)
        device = next(self.runner.parameters()).device
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} group seeds for {len(prompt_ids)} prompts")
        uniforms = None if params.greedy else group_uniforms(
            seeds if seeds is not None else draw_seeds(generator, len(prompt_ids)), group_size, params.max_new_tokens
        ).to(device)  # [T, N]
        rows, fused = len(prompt_ids) * group_size, self._use_fused(device)
        with self._running(rows, fused) as use_onednn:
            decoder = FusedDecoder(self.runner, rows, use_onednn, self._prepack) if fused else None
            ids, logprobs, ends, stopped, stats = self._sample(prompt_ids, group_size, params, uniforms, device,
                                                               decoder)
            del decoder  # the fused weights
        # leave inference mode: the trainer feeds these tensors to autograd
        ids, logprobs, ends, stopped = (x.cpu().clone() for x in (ids, logprobs, ends, stopped))
        width = max(int(ends.max()), 1)  # T: the longest completion
        ids, logprobs = ids[:, :width], logprobs[:, :width]
        mask = torch.arange(width).unsqueeze(0) < ends.unsqueeze(1)  # [N, T]
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=ids.masked_fill(~mask, self.pad_id),
            completion_mask=mask,
            truncated=~stopped & (ends >= params.max_new_tokens),
            group_size=group_size,
            sampling_logprobs=logprobs.masked_fill(~mask, 0.0).float(),
            stats=stats,
        )

    def episodes(self, prompt_ids, group_size, seeds):
        """Multi-turn sampling (grpo.rollout.base.EpisodeSession): each prompt prefilled once, each episode's KV
        cache extended with its turns and the environment's tokens, never prefilled again
        (grpo.rollout.fast_session.FastSession)."""
        from grpo.rollout.fast_session import FastSession

        return FastSession(self, prompt_ids, group_size, seeds)

    @contextmanager
    def _running(self, rows: int, fused: bool):
        """What sampling runs under: the runner in eval mode, inference mode, oneDNN's Linear kernel (where it
        serves) and, through the model's forward with `prepack`, its weights reordered for `rows` rows.
        Yields whether oneDNN is on."""
        device = next(self.runner.parameters()).device
        was_training = self.runner.training
        self.runner.eval()
        try:
            use_onednn = self._use_onednn(device)
            with torch.inference_mode(), onednn.use_in(self.runner, enabled=use_onednn), \
                    onednn.packed(self.runner, rows, enabled=use_onednn and self._prepack and not fused):
                yield use_onednn
        finally:
            self.runner.train(was_training)

    def position_bounds(self) -> list[tuple[int, str]]:
        """The model's bounds on the positions a row may reach, each with what it is: its context
        (config.max_position_embeddings) and its sliding window, where it has them."""
        config = _text_config(self.model)
        bounds = [(_context_length(self.model), "context (config.max_position_embeddings)"),
                  (sliding_window(config), "sliding window")]
        return [(b, what) for b, what in bounds if b is not None]

    def decode_attention(self):
        """The attention kernel context for decode steps of this engine's runner (see _decode_attention)."""
        return _decode_attention(next(self.runner.parameters()).device, next(self.runner.parameters()).dtype)

    def _use_onednn(self, device: torch.device) -> bool:
        possible = onednn.usable(self.runner)
        if self._onednn and not possible:
            dtype = next(self.runner.parameters()).dtype
            raise ValueError(
                f"onednn=True needs float32 or bfloat16 weights on a CPU with oneDNN; got {dtype} on {device}"
            )
        return possible if self._onednn is None else bool(self._onednn)

    def describe(self) -> str:
        """One line for the run's log: how this engine decodes, and why not with the fused decoder."""
        device = next(self.runner.parameters()).device
        copy = f", sampling from a {self._dtype} copy".replace("torch.", "") if self.runner is not self.model else ""
        if self._use_fused(device):
            weights = "weights copied for the batch (prepack)" if self._prepack else "no copy of the weights"
            return f"fast engine: fused decode steps, each prompt's cache shared by its group, {weights}{copy}"
        reason = (
            "sampling.fused is off" if self._fused is False
            else unsupported(self.runner) or f"the fused decoder is on by default only on CPU, not {device.type}"
        )
        return f"fast engine: decoding through the model's forward ({reason}){copy}"

    def _use_fused(self, device: torch.device) -> bool:
        if self._fused is None:
            return device.type == "cpu" and unsupported(self.runner) is None
        return self._fused

    def _check(self, prompt_ids, group_size, params) -> None:
        if group_size < 1 or params.max_new_tokens < 1 or not prompt_ids:
            raise ValueError(
                f"need at least one prompt, group_size >= 1 and max_new_tokens >= 1; got {len(prompt_ids)} prompts, "
                f"group_size={group_size}, max_new_tokens={params.max_new_tokens}"
            )
        context = _context_length(self.model)
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if context is not None and len(p) + params.max_new_tokens > context:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} it needs "
                    f"{len(p) + params.max_new_tokens} positions, but the model's context "
                    f"(config.max_position_embeddings) is {context}: shorten the prompt or lower max_new_tokens"
                )
        window = sliding_window(_text_config(self.model))
        longest = max(len(p) for p in prompt_ids)
        if window is not None and longest + params.max_new_tokens > window:
            raise ValueError(
                f"the model has sliding-window attention over {window} positions and FastEngine's mask is fully "
                f"causal, so the longest prompt ({longest} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                f"must fit in {window}; use the 'hf' engine for longer sequences"
            )

    def _forward(self, ids, positions, mask, cache) -> torch.Tensor:
        """[n, q] ids and positions, [n, 1, q, L+q] additive mask -> [n, V] logits of the last position."""
        kwargs = {self._cache_kwarg: cache, "logits_to_keep": 1} if self._logits_to_keep else {self._cache_kwarg: cache}
        out = self.runner(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        return out.logits[:, -1]

    def _sample(self, prompt_ids, group_size, params, uniforms, device, decoder):
        """Prefill, then decode: with the FusedDecoder `decoder` (the prompt's cache read once per group) or,
        when None, through the model's forward (the prompt's cache copied to each of its G rows).
        Returns raw ids [N, T], log-probs [N, T], ends [N], stopped [N], stats."""
        t0 = time.perf_counter()
        G, T = group_size, params.max_new_tokens
        cache, prompt_bias, logits, next_pos = self._prefill(prompt_ids, G, T, device, shared=decoder is not None)
        decode = decoder.start(cache, prompt_bias, G, T) if decoder is not None else \
            _ForwardDecode(self._forward, cache, prompt_bias, G, T)
        t_prefill = time.perf_counter() - t0
        with _decode_attention(device, next(self.runner.parameters()).dtype):
            out = self._decode(decode, logits, next_pos, params, uniforms)
        ids, logprobs, ends, stopped, row_steps = out
        stats = {
            "prefill_s": t_prefill,
            "decode_s": time.perf_counter() - t0 - t_prefill,
            "tokens": float(ends.sum()),
            "decode_row_steps": float(row_steps),  # sum over decode steps of the rows still running
        }
        return ids, logprobs, ends, stopped, stats

    def _prefill(self, prompt_ids, group_size, max_new_tokens, device, shared: bool):
        """Run the B prompts once, in chunks (no G-fold prefill).

        Returns the cache holding the prompts in rows [0, B) (with room for all N = B*G rows and the
        completions unless `shared`: then exactly B rows and P positions), the additive attention bias of
        the prompt positions [B, P] (0 where a row may attend, the dtype's minimum at padding), the
        next-token logits [N, V], and the position id of each row's next token [N].
        """
        dtype = next(self.runner.parameters()).dtype
        neg = torch.finfo(dtype).min
        B, G, T = len(prompt_ids), group_size, max_new_tokens
        ids, attn = left_pad(prompt_ids, self.pad_id)  # [B, P]
        ids, attn = ids.to(device), attn.to(device).bool()
        P = ids.shape[1]
        rows, length = (B, P) if shared else (B * G, P + T - 1)
        cache = KVCache(_text_config(self.model).num_hidden_layers, max_rows=rows, max_len=length)
        bias = torch.full((B, P), neg, dtype=dtype, device=device).masked_fill_(attn, 0.0)  # [B, P]
        causal = torch.full((P, P), neg, dtype=dtype, device=device).triu(1)  # [P, P]
        positions = (attn.long().cumsum(1) - 1).clamp(min=0)  # [B, P] left padding shifts positions
        chunk = max(1, min(B, PREFILL_TOKENS // P, PREFILL_MASK_ELEMENTS // (P * P)))  # prompts per forward
        cache.reserve(P)
        logits = []
        for i in range(0, B, chunk):
            cache.row_start = i
            mask = (bias[i : i + chunk, None, None, :] + causal).clamp(min=neg)  # [b, 1, P, P]
            logits.append(self._forward(ids[i : i + chunk], positions[i : i + chunk], mask, cache))  # [b, V]
        cache.row_start = 0
        cache.advance(P)
        next_pos = attn.sum(1).repeat_interleave(G)  # [N] the prompt lengths
        return cache, bias, torch.cat(logits).repeat_interleave(G, dim=0), next_pos

    def _decode(self, decode, logits, next_pos, params, uniforms, limits=None):
        """Sample up to T tokens per row; a row leaves the batch (and the cache) once it ends.

        decode: the decode steps, `decode(tokens [n], positions [n]) -> logits [n, V]` for the live rows,
        and `decode.keep_rows(index)` when rows end. uniforms: [T, N] draws (None: greedy). limits: [N] long,
        each row's own token limit (<= T; a row that reaches it ends, not stopped), None: T for every row."""
        N, T, device = logits.shape[0], params.max_new_tokens, logits.device
        out_ids = torch.full((N, T), self.pad_id, dtype=torch.long, device=device)  # [N, T]
        out_logprobs = torch.zeros((N, T), dtype=torch.float32, device=device)  # [N, T]
        ends = torch.full((N,), T, dtype=torch.long, device=device)  # [N] number of real tokens
        stopped = torch.zeros(N, dtype=torch.bool, device=device)  # [N] ended by EOS or a stop string
        rows = torch.arange(N, device=device)  # [n] the original row of each active row
        eos = torch.tensor(sorted(self.eos_ids), device=device)
        stops = _StopStrings(self.tokenizer, params.stop, N)
        row_steps = 0
        for t in range(T):
            # one draw per original row at every step, so a row's samples do not depend on when others end
            uniform = None if uniforms is None else uniforms[t, rows]  # [n]
            tokens, logprobs = next_tokens(logits, params, uniform)  # [n], [n]
            out_ids[rows, t] = tokens
            out_logprobs[rows, t] = logprobs
            done = torch.isin(tokens, eos)  # [n]
            if stops.active:
                done |= stops.check(rows.tolist(), tokens.tolist(), device)
            row_steps += rows.numel()
            ended = done if limits is None else done | (limits[rows] <= t + 1)  # [n]
            any_done = bool(ended.any())
            if any_done:
                ends[rows[ended]] = t + 1
                stopped[rows[done]] = True
            if t == T - 1:
                break
            if any_done:
                keep = fill_holes(ended)  # [m] the rows kept, the last ones moved into the places of those that ended
                if keep.numel() == 0:
                    break
                decode.keep_rows(keep)
                rows, tokens, next_pos = rows[keep], tokens[keep], next_pos[keep]
            logits = decode(tokens, next_pos)  # [n, V]
            next_pos = next_pos + 1
        ends, stopped = stops.exact_ends(ends, stopped)
        return out_ids, out_logprobs, ends, stopped, row_steps


class _ForwardDecode:
    """Decode steps through the model's own forward: each prompt's cache rows are copied to its G samples,
    and the model gets a 4D additive mask over the cache."""

    def __init__(self, forward, cache: KVCache, prompt_bias: torch.Tensor, group_size: int, max_new_tokens: int):
        B, P = prompt_bias.shape  # [B, P]
        N, T = B * group_size, max_new_tokens
        self.forward, self.cache = forward, cache
        cache.repeat_rows(B, group_size)  # each prompt's keys and values, copied G times
        # [N, P+T] per key slot: the prompt's padding mask, then the dtype's minimum until a position is written
        self.bias = prompt_bias.new_full((N, P + T), torch.finfo(prompt_bias.dtype).min)
        self.bias[:, :P] = prompt_bias.repeat_interleave(group_size, dim=0)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.cache.keep_rows(index)
        self.bias[: index.numel()] = self.bias[index]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[n] tokens and positions -> [n, V] next-token logits."""
        n, L = tokens.shape[0], self.cache.length
        self.cache.reserve(L + 1)
        self.bias[:n, L] = 0.0  # the token fed now is attended from now on
        mask = self.bias[:n, None, None, : L + 1]  # [n, 1, 1, L+1]
        logits = self.forward(tokens[:, None], positions[:, None], mask, self.cache)
        self.cache.advance(1)
        return logits


class _StopStrings:
    """Stops rows whose text reaches a stop string, checking only the tail of each row at each step."""

    def __init__(self, tokenizer, stop: tuple[str, ...], rows: int):
        self.tokenizer, self.stop, self.active = tokenizer, stop, bool(stop)
        self.window = max((len(s) for s in stop), default=0) + 4  # tokens: each decodes to >= 1 character
        self.history: list[list[int]] = [[] for _ in range(rows)]

    def check(self, rows: list[int], tokens: list[int], device) -> torch.Tensor:
        """Append each row's new token; [n] bool, True where the row's tail now contains a stop string."""
        tails = []
        for r, tok in zip(rows, tokens):
            self.history[r].append(tok)
            tails.append(self.history[r][-self.window :])
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], dtype=torch.bool, device=device)

    def exact_ends(self, ends, stopped):
        """Cut each row at the shortest prefix whose full decoded text contains a stop string."""
        if not self.active:
            return ends, stopped
        ends, stopped = ends.clone(), stopped.clone()
        for r, history in enumerate(self.history):
            cut = stop_string_end(history[: int(ends[r])], self.tokenizer, self.stop)
            if cut is not None:
                ends[r], stopped[r] = cut, True
        return ends, stopped
