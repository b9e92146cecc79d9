"""FusedDecoder: the engine's decode step on fused weights equals the model's own forward."""

from __future__ import annotations

import pytest
import torch

from grpo.rollout import FastEngine, SamplingParams
from grpo.rollout.decoder import FusedDecoder, unsupported
from grpo.testing import tiny_tokenizer

from rollout_helpers import TEXTS, naive_greedy, peaky, reference_logprobs, rows_as_lists


def tiny(kind: str, vocab_size: int, tied: bool = True, seed: int = 0):
    """A two-layer model of the given family with large random weights (and biases where it has them), so
    that greedy outputs vary and log-probs are far from uniform."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q, k, v biases
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),  # q_norm / k_norm: not supported
    }[kind]
    config = config_class(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=2,
        eos_token_id=3, pad_token_id=1,
    )
    torch.manual_seed(seed)
    return peaky(model_class(config).float().eval(), seed)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False), ("mistral", True)])
@pytest.mark.parametrize("onednn,prepack", [(True, True), (True, False), (False, True)])
def test_fused_greedy_equals_naive_decode_and_logprobs_equal_a_forward(tok, prompts, kind, tied, onednn, prepack):
    model = tiny(kind, len(tok), tied)
    engine = FastEngine(model, tok, onednn=onednn, prepack=prepack, fused=True)
    rollout = engine.generate(prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.0))
    rows = rows_as_lists(rollout)
    for i, p in enumerate(prompts):
        expected = naive_greedy(model, p, 12, engine.eos_ids)
        assert rows[2 * i] == expected and rows[2 * i + 1] == expected
    sampled = engine.generate(prompts, 3, SamplingParams(max_new_tokens=10), torch.Generator().manual_seed(1))
    for row, (ids, logprobs) in enumerate(zip(rows_as_lists(sampled), sampled.sampling_logprobs)):
        expected = reference_logprobs(model, prompts[row // 3], ids)
        torch.testing.assert_close(logprobs[: len(ids)], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_both_decode_paths_on_each_device(tok, prompts, device, dtype, fused):
    """Through the fused decoder and through the model's forward, in float32 and bfloat16, on the CPU and on
    a CUDA device where there is one: greedy output equals a naive decode (float32; bf16 logits tie) and
    the sampled log-probs equal a forward pass, with rows ending at different steps."""
    model = tiny("llama", len(tok)).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = [3, *tok.convert_tokens_to_ids(list("aeiou"))]
    engine = FastEngine(model, tok, fused=fused)
    assert ("fused decode steps" in engine.describe()) == fused
    if dtype == torch.float32:
        greedy = rows_as_lists(engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0.0)))
        assert greedy == [naive_greedy(model, p, 10, engine.eos_ids) for p in prompts for _ in range(2)]
    sampled = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(2))
    assert len(set(sampled.lengths.tolist())) >= 2  # rows ended apart: the batch was compacted
    # bf16 rounding grows with an unlikely token's |log-prob| (the decoder attends in float32, the forward in bf16)
    rtol, atol = (0.0, 1e-4) if dtype == torch.float32 else (0.05, 0.05)
    for row, (ids, logprobs) in enumerate(zip(rows_as_lists(sampled), sampled.sampling_logprobs)):
        expected = reference_logprobs(model, prompts[row // 4], ids)
        torch.testing.assert_close(logprobs[: len(ids)], expected, rtol=rtol, atol=atol)


def test_unpacked_decoder_runs_on_the_models_own_weights(tok):
    """packed=False copies no weight: every matmul reads the model's own tensor (memory stays flat)."""
    model = tiny("qwen2", len(tok))
    decoder = FusedDecoder(model, rows=4, packed=False)
    own = {p.data_ptr() for p in model.parameters()}
    layers = [m for layer in decoder.layers for m in (*layer.qkv, *layer.gate_up, layer.o, layer.down)]
    assert all(m.weight.data_ptr() in own for m in [*layers, decoder.head])
    assert all(m.bias is None or m.bias.data_ptr() in own for m in layers)
    fused = FusedDecoder(model, rows=4, use_onednn=False, packed=True)  # q|k|v concatenated: a copy
    assert len(fused.layers[0].qkv) == 1 and fused.layers[0].qkv[0].weight.data_ptr() not in own


def test_fused_and_model_forward_sample_the_same_completions(tok, prompts):
    model = tiny("llama", len(tok))
    params = SamplingParams(max_new_tokens=16, top_p=0.9)
    fused = FastEngine(model, tok, fused=True).generate(prompts, 4, params, torch.Generator().manual_seed(3))
    plain = FastEngine(model, tok, fused=False).generate(prompts, 4, params, torch.Generator().manual_seed(3))
    assert torch.equal(fused.completion_ids, plain.completion_ids)
    torch.testing.assert_close(fused.sampling_logprobs, plain.sampling_logprobs, rtol=0, atol=1e-5)


def test_fused_bfloat16_logprobs_are_close_to_the_bfloat16_forward(tok, prompts):
    model = tiny("qwen2", len(tok)).to(torch.bfloat16)
    rollout = FastEngine(model, tok, fused=True).generate(
        prompts, 2, SamplingParams(max_new_tokens=8), torch.Generator().manual_seed(0)
    )
    for row, (ids, logprobs) in enumerate(zip(rows_as_lists(rollout), rollout.sampling_logprobs)):
        expected = reference_logprobs(model, prompts[row // 2], ids)
        torch.testing.assert_close(logprobs[: len(ids)], expected, rtol=0, atol=0.1)  # bf16 rounding


def test_lora_adapters_are_merged_into_the_fused_weights(tok, prompts):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama", len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                  "down_proj"]))
    with torch.no_grad():  # peft starts B at zero (no change); give the adapters a real effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    model.eval()
    engine = FastEngine(model, tok, fused=True)
    rows = rows_as_lists(engine.generate(prompts, 1, SamplingParams(max_new_tokens=10, temperature=0.0)))
    assert rows == [naive_greedy(model, p, 10, engine.eos_ids) for p in prompts]
    with model.disable_adapter():  # the base model alone: the fused weights leave the adapters out
        base_rows = rows_as_lists(engine.generate(prompts, 1, SamplingParams(max_new_tokens=10, temperature=0.0)))
        assert base_rows == [naive_greedy(model, p, 10, engine.eos_ids) for p in prompts]
    assert base_rows != rows


def test_unsupported_models_are_named_and_decode_through_their_forward(tok, prompts):
    model = tiny("qwen3", len(tok))
    assert "qwen3" in unsupported(model)
    with pytest.raises(ValueError, match="model_type 'qwen3' is not one of"):
        FastEngine(model, tok, fused=True)
    with pytest.raises(ValueError, match="FusedDecoder cannot run this model"):
        FusedDecoder(model, rows=2)
    rollout = FastEngine(model, tok).generate(prompts, 1, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert rows_as_lists(rollout) == [naive_greedy(model, p, 6, {3}) for p in prompts]
    assert unsupported(tiny("llama", len(tok))) is None


def test_shared_prompt_attention_equals_attention_over_each_rows_own_copy():
    """`attend` reads each group's prompt once; the result is per-row attention over [prompt; completion],
    with padding masked, also after rows have ended (slots a subset)."""
    from grpo.rollout.decoder import attend, group_places

    torch.manual_seed(0)
    B, G, K, g, hd, P, t = 3, 4, 2, 3, 8, 5, 4

    def places(slots):  # None: the fast path for every row, in order
        return None if slots.numel() == B * G else group_places(slots, K, G)

    H = K * g
    prompt_keys, prompt_values = torch.randn(B, K, P, hd), torch.randn(B, K, P, hd)
    pad = torch.zeros(B, P)
    pad[1, :2] = torch.finfo(torch.float32).min  # prompt 1 is left padded by 2
    for slots in (torch.arange(B * G), torch.tensor([0, 2, 3, 5, 9, 11]), torch.tensor([11, 0, 9, 3, 5, 2])):
        n = slots.numel()
        q, keys, values = torch.randn(n, H, hd), torch.randn(n, K, t, hd), torch.randn(n, K, t, hd)
        groups = slots // G
        bias = pad[groups][:, None, None, :]  # [n, 1, 1, P]
        out = attend(q * 0.3, prompt_keys, prompt_values, keys, values, bias, places(slots), G)
        all_keys = torch.cat([prompt_keys[groups], keys], dim=2).repeat_interleave(g, dim=1)  # [n, H, P+t, hd]
        all_values = torch.cat([prompt_values[groups], values], dim=2).repeat_interleave(g, dim=1)
        mask = torch.cat([pad[groups], torch.zeros(n, t)], dim=1)[:, None, None, :]  # [n, 1, 1, P+t]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], all_keys, all_values, attn_mask=mask, scale=0.3
        )  # [n, H, 1, hd]
        torch.testing.assert_close(out, expected.reshape(n, H * hd), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "lora", [{"target_modules": ["embed_tokens", "q_proj"]}, {"target_modules": ["q_proj"], "use_dora": True}]
)
def test_adapters_the_fused_weights_cannot_hold_are_decoded_through_the_forward(tok, prompts, lora):
    """A LoRA adapter on the input embedding, or DoRA (a magnitude vector on top of B A): FusedDecoder says
    so, and the engine decodes through the peft model's forward."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama", len(tok)), LoraConfig(r=4, lora_alpha=8, **lora)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    assert unsupported(model) in ("a LoRA adapter on the input embedding", "DoRA adapters")
    engine = FastEngine(model, tok)
    rows = rows_as_lists(engine.generate(prompts, 1, SamplingParams(max_new_tokens=8, temperature=0.0)))
    assert rows == [naive_greedy(model, p, 8, engine.eos_ids) for p in prompts]


def test_the_engine_says_how_it_decodes(tok):
    llama = tiny("llama", len(tok))
    assert FastEngine(llama, tok).describe() == (
        "fast engine: fused decode steps, each prompt's cache shared by its group, weights copied for the batch "
        "(prepack)"
    )
    assert "no copy of the weights, sampling from a bfloat16 copy" in FastEngine(
        llama, tok, prepack=False, dtype="bfloat16"
    ).describe()
    assert FastEngine(llama, tok, fused=False).describe().endswith("model's forward (sampling.fused is off)")
    assert "(model_type 'qwen3' is not one of" in FastEngine(tiny("qwen3", len(tok)), tok).describe()
