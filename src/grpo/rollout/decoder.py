"""Decode steps for Llama-family models in a handful of tensor ops per layer, on fused weights, with each
prompt's KV cache shared by its G samples.

A decode step feeds one token per row. Through the model's own forward it costs ~70 tensor ops and a
dozen module calls per layer; on a small model on CPU that overhead is a third of the step (SmolLM2-135M,
16 rows: ~11 of ~31 ms). `FusedDecoder` computes the same step from the model's weights with:

    rms_norm -> [q|k|v] matmul -> rotary (q and k at once) -> cache write -> attention
      -> o matmul + residual (one oneDNN call) -> rms_norm -> [gate|up] matmul -> silu * up
      -> down matmul + residual (one oneDNN call)

The q, k, v weights (and gate, up) are concatenated into one matrix per layer, so a layer runs 4
matmuls instead of 7; on CPU each matrix is reordered into oneDNN's blocked layout for the batch.
These copies are made once per generation (`FusedDecoder(model, rows)`), from the weights as they are
then (LoRA adapters merged in), and dropped with the decoder. With `packed=False` nothing is copied:
the 7 matmuls run on the model's own weights (~1.3x slower on CPU, no extra memory).

A multi-turn session (grpo.rollout.fast_session) also feeds several tokens per row in one call (the
environment's answer after a turn): the same ops on [n*q, D], attention causal among a row's q tokens.

Prefill runs the model's forward once per prompt. Its keys and values stay in one copy per prompt: at
each step the G rows of a group read their prompt's cache together, in one matmul (`attend`), and only
the completions have a cache per row. Against G copies of the prompt this reads and holds 1/G of the
prompt's cache: with 400-token prompts, G = 8, a generation ran 1.2x faster; with 35-token prompts the
extra reshuffling of the queries costs about what it saves.

Attention, and the completions' cache, are float32 whatever the weights' dtype (bfloat16 weights: q, k
and v are cast after the rotary, which runs in the weights' dtype as in the model): PyTorch's bfloat16
batched matmul on CPU copies its strided operands first, and the float32 one does not (a bfloat16
generation at 2x8x64 ran 1.14x faster). The softmax is float32 in both, as in eager attention.

Supported: `transformers` Llama, Mistral and Qwen2 causal LMs (SmolLM2 is a Llama), plain or wrapped by
peft LoRA, with the model's own rotary embedding (any RoPE scaling it implements). `unsupported(model)`
says why another model is not, and the engine then decodes through the model's forward.

Vocabulary: B prompts, G samples per prompt, N = B*G rows, n rows decoding, D hidden size, H query heads,
K key/value heads, g = H/K, hd head dim, F MLP width, P padded prompt width, t completion positions
cached (this step's included), V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo.backend import onednn
from grpo.rollout.cache import KVCache

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model) -> str | None:
    """Why `FusedDecoder` cannot run `model`, or None when it can."""
    base = _base(model)
    config = base.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    decoder = getattr(base, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, a) for a in needed) or not hasattr(base, "lm_head"):
        return "the model does not have the Llama module layout (model.embed_tokens/layers/norm/rotary_emb, lm_head)"
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
            hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        ) or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return "a decoder layer does not have the Llama attention / MLP layout"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "the attention normalises q and k (q_norm / k_norm)"
    if hasattr(decoder.embed_tokens, "base_layer"):
        return "a LoRA adapter on the input embedding"
    if any(any(getattr(m, "use_dora", {}).values()) for m in base.modules()):
        return "DoRA adapters"
    return None


def effective_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight [out, in], bias [out] or None) that `module` applies: an nn.Linear's own, or a peft LoRA
    layer's base weight plus its active adapters' delta (alpha / r) B A, as `refresh_merged` computes it."""
    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
        weight, bias = module.base_layer.weight, module.base_layer.bias
        if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                weight = weight + sum(module.get_delta_weight(a) for a in adapters)
        return weight.detach(), None if bias is None else bias.detach()
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def _fuse(modules, scale_first: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of `modules` stacked along the output dim: [sum out, in], and their biases (zeros where
    a module has none) or None when none has one. The first module's rows (and bias) are multiplied by
    `scale_first`: for q, attention's 1/sqrt(head_dim), so no step scales the scores (RoPE is linear)."""
    pairs = [effective_weight(m) for m in modules]
    if scale_first != 1.0:
        w, b = pairs[0]
        pairs[0] = (w * scale_first, None if b is None else b * scale_first)
    weight = torch.cat([w for w, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
    if all(b is None for _, b in pairs):
        return weight, None
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])
    return weight, bias


class _Matmul:
    """x @ W.T + b (+ residual) for one weight, prepared once: on CPU through oneDNN on W reordered for
    the batch (`packed`), elsewhere `F.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, packed: bool, use_onednn: bool):
        self.bias = bias
        matmul = onednn.matmul_for(weight)
        self.kernel = matmul if use_onednn and matmul is not F.linear else None  # oneDNN's, or None: F.linear
        self.weight = onednn.reordered(weight, rows) if self.kernel and packed else weight

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.bias, residual)
        out = F.linear(x, self.weight, self.bias)
        return out if residual is None else out.add_(residual)


class _Layer:
    """One decoder layer's matmuls: fused ([q|k|v], [gate|up], the attention scaling folded into q's rows),
    or, with `fuse=False`, the model's own weights as they are (no copy; q is scaled after its matmul)."""

    def __init__(self, layer, matmul, fuse: bool):
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:
            self.qkv = [matmul(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj], scale_first=attn.scaling))]
            self.gate_up = [matmul(*_fuse([mlp.gate_proj, mlp.up_proj]))]
        else:
            self.qkv = [matmul(*effective_weight(m)) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
            self.gate_up = [matmul(*effective_weight(m)) for m in (mlp.gate_proj, mlp.up_proj)]
        self.scaling = attn.scaling
        self.o = matmul(*effective_weight(attn.o_proj))
        self.down = matmul(*effective_weight(mlp.down_proj))
        self.norm1 = (layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.variance_epsilon)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [n, (H+2K) * hd]: q (scaled for attention), k, v side by side."""
        if len(self.qkv) == 1:
            return self.qkv[0](x)
        q, k, v = (m(x) for m in self.qkv)
        return torch.cat([q.mul_(self.scaling), k, v], dim=1)

    def mlp(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """[n, D] -> residual + down(silu(gate(x)) * up(x)): [n, D]."""
        if len(self.gate_up) == 1:
            gate_up = self.gate_up[0](x)  # [n, 2F]
            gate, up = gate_up.chunk(2, dim=1)
        else:
            gate, up = (m(x) for m in self.gate_up)  # [n, F] each
        return self.down(F.silu(gate).mul_(up), residual=residual)


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """[n, D] -> [n, D]: x / rms(x) * weight, as Llama's RMSNorm (computed in float32, scaled in x's dtype)."""
    weight, eps = norm
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in Llama's half-split layout: [n, heads, hd] -> [n, heads, hd], x * cos + rotate_half(x) * sin.

    cos: [n, 1, hd]; sin_signed: [n, 1, hd], sin with its first half negated, so that rotate_half(x) * sin
    = swap_halves(x) * sin_signed.
    """
    n, heads, hd = x.shape
    swapped = x.view(n, heads, 2, hd // 2).flip(2).view(n, heads, hd)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_signed)


def group_places(slots: torch.Tensor, kv_heads: int, group_size: int) -> torch.Tensor:
    """Where each live row's kv heads go in the grouped layout [B, K, G] (flattened): [n * K] long,
    (b * K + k) * G + i for sample i of prompt b (its slot b * G + i) and kv head k."""
    b, i = slots // group_size, slots % group_size  # [n] each
    k = torch.arange(kv_heads, device=slots.device)  # [K]
    return ((b[:, None] * kv_heads + k) * group_size + i[:, None]).view(-1)


def to_groups(x: torch.Tensor, places: torch.Tensor | None, groups: int, group_size: int) -> torch.Tensor:
    """[n, K, g, d] per live row -> [B, K, G*g, d]: each row in its group's block (sample i of prompt b goes
    to block b, rows i*g ... (i+1)*g - 1), zeros for the rows that ended. places: `group_places` of the
    live rows, or None when every row is live and in slot order."""
    n, K, g, d = x.shape
    B, G = groups, group_size
    if places is None:
        return x.view(B, G, K, g, d).transpose(1, 2).reshape(B, K, G * g, d)
    grouped = x.new_zeros(B * K * G, g * d)
    grouped.index_copy_(0, places, x.reshape(n * K, g * d))
    return grouped.view(B, K, G * g, d)


def to_rows(y: torch.Tensor, places: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """[B, K, G*g, d] -> [n, K, g, d] for the live rows (the inverse of `to_groups`)."""
    B, K, Gg, d = y.shape
    G, g = group_size, Gg // group_size
    if places is None:
        return y.view(B, K, G, g, d).transpose(1, 2).reshape(B * G, K, g, d)
    return y.reshape(B * K * G, g * d).index_select(0, places).view(-1, K, g, d)


def attend(
    q: torch.Tensor,  # [n, H, hd] one query per row, or [n, q, H, hd]: q queries per row
    prompt_keys: torch.Tensor,  # [B, K, P, hd] each group's prompt, shared by its G rows
    prompt_values: torch.Tensor,  # [B, K, P, hd]
    keys: torch.Tensor,  # [n, K, t, hd] each row's own completion so far, this step's keys included
    values: torch.Tensor,  # [n, K, t, hd]
    prompt_bias: torch.Tensor,  # [n, 1, 1, P] additive mask over each row's prompt (0, or a large negative at padding)
    places: torch.Tensor | None,  # [n * K] long: `group_places` of the live rows; None: all rows, in slot order
    group_size: int,
    own_bias: torch.Tensor | None = None,  # [n, 1, q, t] additive mask over each row's own keys; None: all attended
) -> torch.Tensor:
    """Grouped-query attention of each row's queries over its prompt and its own completion: [n * q, H * hd].

    The queries come scaled (by 1/sqrt(hd), or the model's scaling). Query head h reads key/value head
    h // g. The prompt's keys and values are read once per group, in one matmul for the G rows of the
    group (not once per row from G copies); one softmax spans both parts. Several queries per row (a
    multi-turn episode's new tokens, `grpo.rollout.fast_session`) need `own_bias` to be causal among them.
    """
    B, K, P, _ = prompt_keys.shape
    if q.dim() == 3:  # one query per row (the decode step: as few ops as it takes)
        (n, H, hd), Q = q.shape, 1
        q = q.reshape(n, K, H // K, hd)  # [n, K, g, hd]
    else:
        n, Q, H, hd = q.shape
        q = q.view(n, Q, K, H // K, hd).transpose(1, 2).reshape(n, K, Q * H // K, hd)  # [n, K, q*g, hd]
    g, t = H // K, keys.shape[2]
    grouped = torch.matmul(to_groups(q, places, B, group_size), prompt_keys.transpose(-1, -2))  # [B, K, G*q*g, P]
    scores = torch.cat([to_rows(grouped, places, group_size), torch.matmul(q, keys.transpose(-1, -2))], dim=-1)
    scores[..., :P].add_(prompt_bias)  # [n, K, q*g, P+t]
    if own_bias is not None and Q == 1:
        scores[..., P:].add_(own_bias)  # [n, 1, 1, t]
    elif own_bias is not None:
        scores.view(n, K, Q, g, P + t)[..., P:].add_(own_bias.unsqueeze(3))  # [n, 1, q, 1, t]
    probs = scores.softmax(dim=-1)  # float32: FusedDecoder attends in float32 whatever the weights' dtype
    out = torch.matmul(probs[..., P:], values)  # [n, K, q*g, hd]
    from_prompt = torch.matmul(to_groups(probs[..., :P], places, B, group_size), prompt_values)  # [B, K, G*q*g, hd]
    out = out.add_(to_rows(from_prompt, places, group_size))
    if Q == 1:
        return out.view(n, H * hd)
    return out.view(n, K, Q, g, hd).transpose(1, 2).reshape(n * Q, H * hd)


class FusedDecoder:
    """Decode steps of a Llama-family model (see the module doc), over weights fused at construction.

    `start(...)` takes the prefilled prompts and returns the decoder, ready for steps: `decoder(tokens,
    positions)` feeds one token per live row and returns the next-token logits, `keep_rows(index)` drops
    the rows that ended. Each prompt's cache is read once per group at every step, not copied to its G rows.

    rows: the batch the matmuls are reordered for (the number of rows decoding at the start);
    use_onednn: run the matmuls through oneDNN (CPU, float32 / bfloat16; ignored elsewhere);
    packed: concatenate q|k|v and gate|up and, with oneDNN, reorder every weight into its blocked layout
      for `rows` rows: one copy of the Linear weights while decoding. False: the model's own weights
      as they are (no copy), 7 matmuls a layer.
    """

    def __init__(self, model, rows: int, use_onednn: bool = True, packed: bool = True):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"FusedDecoder cannot run this model: {reason}")
        base = _base(model)
        decoder, config = base.model, base.config

        def matmul(weight, bias):
            return _Matmul(weight, bias, rows, packed, use_onednn)

        with torch.no_grad():
            self.embed = decoder.embed_tokens.weight.detach()
            self.layers = [_Layer(layer, matmul, fuse=packed) for layer in decoder.layers]
            self.norm = (decoder.norm.weight.detach(), decoder.norm.variance_epsilon)
            self.head = matmul(*effective_weight(base.lm_head))
        self.rotary = decoder.rotary_emb
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = decoder.layers[0].self_attn.head_dim

    def start(self, prompt_cache, prompt_bias: torch.Tensor, group_size: int, max_new_tokens: int) -> FusedDecoder:
        """Decode from prompts prefilled into `prompt_cache` (a KVCache, prompts in rows [0, B), P positions),
        with their additive padding bias [B, P], G samples per prompt, up to T new tokens per row."""
        B, P = prompt_bias.shape
        # attention runs in float32 whatever the weights' dtype: the cache's matmuls then take MKL's batched
        # kernel (bfloat16's copies its strided operands first), and the softmax is float32 as in eager attention
        self.prompt = [(c.keys[:B, :, :P].float(), c.values[:B, :, :P].float()) for c in prompt_cache.layers]
        self.group_size = group_size
        # each row's own keys and values; the last sampled token is never fed, hence T - 1 positions
        self.cache = KVCache(len(self.layers), max_rows=B * group_size, max_len=max(max_new_tokens - 1, 1))
        self.slots = torch.arange(B * group_size, device=prompt_bias.device)  # [n] row b*G + i: sample i of prompt b
        self.places = None  # every row live, in slot order
        self.places_all = B * group_size  # the rows `places` None stands for
        self.row_bias = prompt_bias.float().repeat_interleave(group_size, dim=0)[:, None, None, :]  # [n, 1, 1, P]
        return self

    def keep_rows(self, index: torch.Tensor, live: int | None = None) -> None:
        """Row j becomes row index[j] ([m] long, distinct, any order); the others are dropped. The first
        `live` rows (all m when None) are the ones the next steps feed."""
        self.cache.keep_rows(index)
        self.reindex(index, live)

    def reindex(self, index: torch.Tensor, live: int | None = None) -> None:
        """The rows' prompts follow a move of the cache's rows made by the caller: row j is now old row
        index[j]; the first `live` rows (all when None) are the ones the next steps feed."""
        self.slots = self.slots[index]
        self.row_bias = self.row_bias[index]
        live_slots, N = self.slots[:live], self.places_all
        in_order = live_slots.numel() == N and bool((live_slots == torch.arange(N, device=live_slots.device)).all())
        self.places = None if in_order else group_places(live_slots, self.kv_heads, self.group_size)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, own_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids and their positions, [n] (one per live row) or [n, q] (q per row, run in one forward, all
        matmuls on [n*q, D]) -> [n, V] next-token logits after each row's last token. The first n rows of
        the cache take the keys and values. own_bias: [n, 1, q, t] additive mask over the rows' own cache
        (this call's keys included, t positions); None: every cached position attended (one token per row)."""
        H, K, hd, G = self.heads, self.kv_heads, self.head_dim, self.group_size
        cache, single = self.cache, tokens.dim() == 1  # single: one token per row, the decode step
        n, q = (tokens.shape[0], 1) if single else tokens.shape
        cache.reserve(cache.length + q)
        h = F.embedding(tokens if single else tokens.reshape(-1), self.embed)  # [n*q, D]
        cos, sin = self.rotary(h, positions[:, None] if single else positions.reshape(-1, 1))  # [n*q, 1, hd] each
        half = hd // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # [n*q, 1, hd]
        row_bias = self.row_bias[:n]  # [n, 1, 1, P]
        for layer, kv, (prompt_keys, prompt_values) in zip(self.layers, cache.layers, self.prompt):
            x = rms_norm(h, layer.norm1)
            qkv = layer.project_qkv(x).view(n * q, H + 2 * K, hd)  # [n*q, H+2K, hd]
            qk = rotate(qkv[:, : H + K], cos, sin_signed).float()  # [n*q, H+K, hd], attention in float32
            if single:
                queries, new_keys, new_values = qk[:, :H], qk[:, H:, None], qkv[:, H + K :, None].float()
            else:
                queries = qk[:, :H].view(n, q, H, hd)
                new_keys = qk[:, H:].view(n, q, K, hd).transpose(1, 2)  # [n, K, q, hd]
                new_values = qkv[:, H + K :].float().view(n, q, K, hd).transpose(1, 2)
            keys, values = kv.update(new_keys, new_values)  # [n, K, t, hd] each
            out = attend(queries, prompt_keys, prompt_values, keys, values, row_bias, self.places, G, own_bias)
            h = layer.o(out.to(h.dtype), residual=h)  # [n*q, D]
            h = layer.mlp(rms_norm(h, layer.norm2), residual=h)  # [n*q, D]
        cache.advance(q)
        if q > 1:
            h = h.view(n, q, -1)[:, -1]  # [n, D] each row's last token
        return self.head(rms_norm(h, self.norm))  # [n, V]
