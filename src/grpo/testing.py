"""A tiny random model and a character-level tokenizer, built in code.

Tests, smoke runs and benchmarks of the machinery use these: they need no
download, load in milliseconds, and exercise the same code paths as a real
model (chat template, EOS, padding, KV cache).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int | None = None):
    """A character-level fast tokenizer with a ChatML chat template; EOS is `<|im_end|>`. With vocab_size,
    the vocabulary is filled up to that size with tokens `<tN>` that text never encodes to but that decode
    (for a model with a real model's vocabulary size, e.g. 151936 as Qwen2.5's, in benchmarks)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIAL_TOKENS + list(string.printable)
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab_size or 0)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, tied: bool = True):
    """A randomly initialised Llama with `layers` layers: a few hundred thousand parameters; its output
    head shares the input embedding's weight unless `tied` is False."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float().eval()


def tiny_model_and_tokenizer(seed: int = 0):
    tok = tiny_tokenizer()
    return tiny_model(len(tok), seed=seed), tok


def save_tiny_model(path: str | Path, seed: int = 0, hidden: int = 64) -> Path:
    """Write the tiny model and tokenizer as an HF folder that `grpo` and `transformers` load (vLLM's CPU
    attention needs a head size of 32 or more: hidden=128)."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=seed, hidden=hidden)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
