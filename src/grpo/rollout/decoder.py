"""A decode step for Llama-family models in a handful of tensor ops per layer, on fused weights.

A decode step feeds one token per row. Through the model's own forward it costs ~70 tensor ops and a
dozen module calls per layer; on a small model on CPU that overhead is a third of the step (SmolLM2-135M,
16 rows: ~11 of ~31 ms). `FusedDecoder` computes the same step from the model's weights with:

    rms_norm -> [q|k|v] matmul -> rotary (q and k at once) -> cache write -> attention (4 ops)
      -> o matmul + residual (one oneDNN call) -> rms_norm -> [gate|up] matmul -> silu * up
      -> down matmul + residual (one oneDNN call)

The q, k, v weights (and gate, up) are concatenated into one matrix per layer, so a layer runs 4
matmuls instead of 7; on CPU each matrix is reordered into oneDNN's blocked layout for the batch.
These copies are made once per generation (`FusedDecoder(model, rows)`), from the weights as they are
then (LoRA adapters merged in), and dropped with the decoder. Prefill still runs the model's forward,
which writes the same KV cache this step reads and extends.

Supported: `transformers` Llama, Mistral and Qwen2 causal LMs (SmolLM2 is a Llama), plain or wrapped by
peft LoRA, with the model's own rotary embedding (any RoPE scaling it implements). `unsupported(model)`
says why another model is not, and the engine then decodes through the model's forward.

Vocabulary: n rows decoding, D hidden size, H query heads, K key/value heads, g = H/K, hd head dim,
F MLP width, L cache length before this step, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo import onednn

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


def _fuse(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of `modules` stacked along the output dim: [sum out, in], and their biases (zeros where
    a module has none) or None when none has one."""
    pairs = [effective_weight(m) for m in modules]
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
        self.onednn = use_onednn and onednn.matmul_for(weight) is not F.linear
        reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if self.onednn else None
        self.weight = reorder(weight, max(1, rows)) if packed and reorder is not None else weight

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.onednn:
            out = F.linear(x, self.weight, self.bias)
            return out if residual is None else out.add_(residual)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


class _Layer:
    def __init__(self, layer, matmul):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = matmul(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
        self.o = matmul(*effective_weight(attn.o_proj))
        self.gate_up = matmul(*_fuse([mlp.gate_proj, mlp.up_proj]))
        self.down = matmul(*effective_weight(mlp.down_proj))
        self.norm1 = (layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.variance_epsilon)
        self.scaling = attn.scaling


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """[n, D] -> [n, D]: x / rms(x) * weight, as Llama's RMSNorm (computed in float32, scaled in x's dtype)."""
    weight, eps = norm
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in Llama's half-split layout: [n, heads, hd] -> [n, heads, hd], x * cos + rotate_half(x) * sin.

    cos: [n, 1, hd]; sin_signed: [n, 1, hd], sin with its first half negated, so that rotate_half(x) * sin
    = swap_halves(x) * sin_signed.
    """
    n, heads, hd = x.shape
    swapped = x.view(n, heads, 2, hd // 2).flip(2).view(n, heads, hd)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, sin_signed)


def attend(
    q: torch.Tensor,  # [n, H, hd] one query per row
    keys: torch.Tensor,  # [n, K, L+1, hd] the cache, this step's key included (a strided view)
    values: torch.Tensor,  # [n, K, L+1, hd]
    bias: torch.Tensor,  # [n, 1, 1, L+1] additive mask: 0 where a row may attend, a large negative elsewhere
    scaling: float,
) -> torch.Tensor:
    """Grouped-query attention of one query per row: [n, H * hd]. Query head h reads key/value head h // g."""
    n, H, hd = q.shape
    K = keys.shape[1]
    q = q.view(n, K, H // K, hd)  # [n, K, g, hd]
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scaling).add_(bias)  # [n, K, g, L+1]
    if scores.dtype == torch.float32:
        probs = scores.softmax(dim=-1)
    else:  # as eager attention: softmax in float32
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.matmul(probs, values).view(n, H * hd)  # [n, K, g, hd] -> [n, H * hd]


class FusedDecoder:
    """One decode step of a Llama-family model (see the module doc), over weights fused at construction.

    rows: the batch the matmuls are reordered for (the number of rows decoding at the start);
    use_onednn: run the matmuls through oneDNN (CPU, float32 / bfloat16; ignored elsewhere);
    packed: with oneDNN, on weights reordered into its blocked layout for `rows` rows.
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
            self.layers = [_Layer(layer, matmul) for layer in decoder.layers]
            self.norm = (decoder.norm.weight.detach(), decoder.norm.variance_epsilon)
            self.head = matmul(*effective_weight(base.lm_head))
        self.rotary = decoder.rotary_emb
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = decoder.layers[0].self_attn.head_dim

    def __call__(self, tokens, positions, mask, cache) -> torch.Tensor:
        """[n, 1] token ids and positions, [n, 1, 1, L+1] additive mask, the KVCache at length L (its rows
        [0, n) the live rows, with room for position L) -> [n, V] next-token logits. Writes position L."""
        H, K, hd = self.heads, self.kv_heads, self.head_dim
        n, L = tokens.shape[0], cache.length
        h = F.embedding(tokens[:, 0], self.embed)  # [n, D]
        cos, sin = self.rotary(h, positions)  # [n, 1, hd] each
        half = hd // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # [n, 1, hd]
        for layer, kv in zip(self.layers, cache.layers):
            x = rms_norm(h, layer.norm1)
            qkv = layer.qkv(x).view(n, H + 2 * K, hd)  # [n, H+2K, hd]
            qk = rotate(qkv[:, : H + K], cos, sin_signed)  # [n, H+K, hd]
            kv.keys[:n, :, L] = qk[:, H:]
            kv.values[:n, :, L] = qkv[:, H + K :]
            out = attend(qk[:, :H], kv.keys[:n, :, : L + 1], kv.values[:n, :, : L + 1], mask, layer.scaling)
            h = layer.o(out, residual=h)  # [n, D]
            x = rms_norm(h, layer.norm2)
            gate_up = layer.gate_up(x)  # [n, 2F]
            F_ = gate_up.shape[1] // 2
            act = F.silu(gate_up[:, :F_]).mul_(gate_up[:, F_:])  # [n, F]
            h = layer.down(act, residual=h)  # [n, D]
        return self.head(rms_norm(h, self.norm))  # [n, V]
