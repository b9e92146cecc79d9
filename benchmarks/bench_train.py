"""One GRPO training step, ours against Hugging Face TRL's GRPOTrainer: seconds per step, peak memory, phases.

TRL lives in its own virtualenv (never in .venv), made once:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 trl peft

Then (prints the tables; it never asserts a time):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py              # full fine-tuning and LoRA, both precisions
    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --no-lora --steps 5   # full fine-tuning only
    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --precisions float32 --backends cpu_fast   # as before issue 28
    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --only ours --markdown /tmp/train.md
    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --steps 2 --max-new-tokens 8 --threads 1   # smoke test
    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --only ours --no-lora --engine vllm   # a step with vLLM

Precisions and backends (issue 28): for each of --precisions (float32, bfloat16) TRL runs once (bf16=True for
bfloat16: its Trainer's bfloat16 autocast over float32 weights) and ours once per --backends entry (cpu_fast,
plain) with trainer.precision set to match; under bfloat16 ours samples with a bfloat16 copy of the weights
(sampling.dtype=bfloat16; --bf16-sampling-policy samples with the float32 policy instead), as TRL's generation runs
under its autocast. A child first measures the machine's matmul peak (float32 and bfloat16, 2048^3, the faster of
oneDNN's op and torch.mm) and the phase table gives each phase's model FLOPs as a share of the peak of its precision
(`step_flops`: 2 FLOPs per Linear weight per token of every row's prompt and completion, the head at completion
tokens; the training phase 3x a forward).

With --engine vllm our side runs in the vLLM virtualenv (.venv-vllm, `make setup-vllm`; --ours-python
overrides it): the whole step, sampling with a colocated vllm.LLM whose weights are pushed after the update
(the phase table's "sync" column, also inside "train").

Both sides train the default model (SmolLM2-135M-Instruct, its converted Hugging Face folder
`grpo.models.resolve_model_folder(None)`) with float32 weights on the CPU with the same settings: G = 8 completions
per prompt, 2 prompts per step (16 completions), --max-new-tokens (64) new tokens at most, temperature 1.0
(no top-k / top-p), beta = 0.04 (k3 KL against a frozen reference), AdamW lr 1e-6 with a constant schedule,
loss "grpo" (per-sequence mean, then mean over the batch), advantages centered and divided by the group
std, one gradient step per generated batch (ours algorithm.mu=1, TRL num_iterations=1), gradient clipping
at norm 1.0, no gradient checkpointing (ours trainer.gradient_checkpointing=false, TRL
activation_checkpointing=False; --checkpointing turns it on for both: TRL's default), --threads (2)
torch threads, no dropout. How the 16 completions are
split for the forward/backward does not change the math: TRL runs all 16 at once
(per_device_train_batch_size=16, no accumulation); ours groups them by length under a token budget
(trainer.micro_batch_tokens=--micro-batch-tokens, default 1024, our default; 0: all 16 at once), each
micro-batch cut to its own longest row.

Prompts: the demo task of configs/default.yaml (one-digit + and -), drawn in our PromptSampler's order
and rendered with `grpo.data.chat_messages`; the orchestrator writes them once to a JSON file and both
sides take them in that order, as chat messages, so both apply the tokenizer's chat template (the run
checks that both sides tokenized the very same prompt ids). Reward: ours the built-in answer_accuracy,
TRL `answer_accuracy` below, a port of it (<answer> tag, else \\boxed{}, else the last number, compared
numerically). Sampling seeds cannot line up across the two code bases, so completion lengths differ a
little; the phase table shows the mean completion length of each side.

Each side runs in its own process (ours: .venv/bin/python, which never imports trl; TRL: --trl-python,
which never imports grpo) and prints one JSON line: the wall seconds of every step, the phase seconds,
completion tokens, and peak resident memory (ru_maxrss). Step 1 is a warm-up; s/step is the median
of steps 2..N. With --rounds N every side runs N times, taking turns (TRL, ours, TRL, ours ...), and the table
adds the lowest and highest ours/TRL of a round's runs: this host's speed drifts by tens of percent within
minutes, and one pair of runs can land on either side of such a drift.
Ours sets up its process as `grpo train` does on a CPU (`grpo.host.set_up`: its threads, and glibc keeping large freed blocks for reuse; GRPO_KEEP_FREED_MEMORY=0 in the environment turns that off);
TRL's runs with glibc's default allocator, as its users run it.

What a timed step holds:
- ours: `Trainer.step()`, timed around the call: sampling (`--engine`, default `fast` as in
  configs/default.yaml; `--engine hf` samples with `model.generate` like TRL), rewards and advantages,
  the reference model's log-probs, then forward + backward + clip + AdamW step.
- TRL: from `on_step_begin` to `on_step_end` of a TrainerCallback. In TRL 1.16 (checked) generation,
  rewards and the reference forward happen in `_prepare_inputs`, called by `training_step`, after
  `on_step_begin`, so they are inside the timed span. With num_iterations=1 and no gradient
  accumulation TRL computes no old log-probs (the ratio uses the detached current ones, as ours with
  mu=1). Its reference is a second model loaded from the folder (full fine-tuning) or the same model
  with the adapter disabled (LoRA; ours does the same with lora.enabled). TRL samples with
  `model.generate` on 16 rows (each prompt repeated 8 times, so every prompt is prefilled 8 times;
  our fast engine prefills it once). TRL's own defaults that differ from ours and are set to ours
  here: gradient_checkpointing (TRL default True; --checkpointing keeps it, and turns ours on), a linear-decay
  lr schedule, adam_beta2 0.999, use_bias_correction_kl (the KL term times the ratio), dataset shuffling.
  TRL phases come from wrapping `GRPOTrainer._generate` (tokenize + generate + decode),
  `_calculate_rewards` and `_get_per_token_logps_and_entropies` under no_grad (the reference); its
  "train" is the rest of the step (advantages, loss forward, backward, clip, AdamW). Ours are the
  trainer's `time/*` metrics: "reward" is time/score (decode, rewards, advantages), "train" time/train.

LoRA (the second row): TRL `peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
target_modules="all-linear", task_type="CAUSAL_LM")`; ours the overrides lora.enabled=true lora.r=16
lora.alpha=32 lora.dropout=0.0 lora.target_modules=all-linear (the `lora:` config section), and
sampling.dtype=float32 (--lora-sampling-dtype): our engine samples with a float32 copy of the model
that has the adapters merged in, refreshed before every generation (the policy's numbers up to
rounding; it costs one more copy of the base weights, which the peak memory column includes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GROUP_SIZE = 8  # G
PROMPTS_PER_STEP = 2  # B: 16 completions a step
BETA = 0.04
LR = 1e-6
TEMPERATURE = 1.0
MAX_GRAD_NORM = 1.0
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
# the demo task of configs/default.yaml
TASK = {
    "data.task": "arithmetic", "data.digits": 1, "data.operators": ["+", "-"], "data.num_eval": 80,
    "data.instruction": "What is {question}? Reply with only the number.",
}  # fmt: skip
MARK = "[bench_train]"  # children's progress lines on stderr that the orchestrator echoes


def log(text: str) -> None:
    print(f"{MARK} {text}", file=sys.stderr, flush=True)


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def overrides_for(args, model_folder: str | None = None) -> list[str]:
    """Our config: the shared settings above as dotted overrides (values as JSON, which YAML reads)."""
    values = {
        **TASK,
        "model.path": model_folder, "model.dtype": "float32", "model.device": "cpu", "model.threads": args.threads,
        "sampling.group_size": GROUP_SIZE, "sampling.max_new_tokens": args.max_new_tokens,
        "sampling.temperature": TEMPERATURE, "sampling.top_p": 1.0, "sampling.top_k": 0, "sampling.engine": args.engine,
        "algorithm.beta": BETA, "algorithm.kl_estimator": "k3", "algorithm.loss_type": "grpo",
        "algorithm.scale_rewards": "group", "algorithm.mu": 1,
        "trainer.steps": args.steps, "trainer.batch_size": GROUP_SIZE * PROMPTS_PER_STEP,
        "trainer.micro_batch_size": GROUP_SIZE * PROMPTS_PER_STEP, "trainer.micro_batch_tokens": args.micro_batch_tokens or None,
        "sampling.dtype": sampling_dtype(args),
        "trainer.backend": getattr(args, "backend", "auto"), "trainer.precision": getattr(args, "precision", "float32"),
        "trainer.gradient_checkpointing": bool(getattr(args, "checkpointing", False)), "trainer.lr": LR, "trainer.lr_schedule": "constant",
        "trainer.warmup_steps": 0, "trainer.weight_decay": 0.0, "trainer.max_grad_norm": MAX_GRAD_NORM,
        "trainer.seed": args.seed, "eval.before": False, "eval.after": False,
        "sampling.enforce_eager": bool(getattr(args, "vllm_eager", False)),
        "output.dir": os.path.join(tempfile.gettempdir(), "bench_train_unused"), "output.tensorboard": False,
    }  # fmt: skip
    if getattr(args, "lora", False):
        values.update({f"lora.{k}": v for k, v in LORA.items()})
        values["lora.enabled"] = True
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def sampling_dtype(args) -> str | None:
    """Ours: sampling.dtype. LoRA: --lora-sampling-dtype (a merged copy); bfloat16 training: a bfloat16 copy
    (TRL's bf16=True samples under its bfloat16 autocast too), unless --bf16-sampling-policy."""
    if getattr(args, "lora", False):
        return args.lora_sampling_dtype or None
    if getattr(args, "precision", "float32") == "bfloat16" and not getattr(args, "bf16_sampling_policy", False):
        return "bfloat16"
    return None


# -- the prompts: written once by our venv, read by both sides -----------------------------------------


def side_prompts(args) -> None:
    """Write {"model_folder", "rows"}: the first steps x B prompts our sampler draws, as chat messages."""
    from grpo.config import load_config
    from grpo.data import PromptSampler, chat_messages, load_task
    from grpo.models import resolve_model_folder
    from grpo.run import needed_columns

    config = load_config(None, overrides_for(args))
    task = load_task(config.data, needed_columns(config))
    drawn = PromptSampler(task.train, config.data.seed).next(args.steps * PROMPTS_PER_STEP)
    rows = [
        {"prompt": chat_messages(r[config.data.prompt_column], config.data.system_prompt), "answer": r["answer"],
         "question": r["question"]}
        for r in drawn
    ]  # fmt: skip
    folder = str(resolve_model_folder(None, log=lambda *a, **k: None))
    with open(args.prompts, "w") as f:
        json.dump({"model_folder": folder, "rows": rows}, f)


class InOrder:
    """Hands out the rows in the file's order (instead of PromptSampler's shuffle), as TRL does with
    shuffle_dataset=False."""

    def __init__(self, rows: list[dict]):
        self.rows, self.index = rows, 0

    def next(self, count: int) -> list[dict]:
        out = [self.rows[(self.index + i) % len(self.rows)] for i in range(count)]
        self.index += count
        return out


def prompt_digest(prompt_ids: list[list[int]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([list(map(int, p)) for p in prompt_ids]).encode()).hexdigest()[:16]


# -- ours ---------------------------------------------------------------------------------------------


def side_ours(args) -> None:
    import torch

    from grpo import host

    host.set_up(args.threads, "cpu")  # as `grpo train` sets up a CPU run: threads, the allocator's policy
    from grpo.config import Config, load_config
    from grpo.models import encode_prompt
    from grpo.run import build_trainer, load_for_training

    if args.lora and "lora" not in Config.model_fields:
        raise SystemExit(
            "ours with LoRA: this checkout's config has no `lora:` section yet (lora.enabled, lora.r, ...), "
            "so our side cannot train a LoRA adapter; run with --no-lora, or after the LoRA support lands"
        )
    data = json.load(open(args.prompts))
    rows = data["rows"]
    config = load_config(None, overrides_for(args, data["model_folder"]))
    torch.manual_seed(config.trainer.seed)
    model, tokenizer, folder, engine, ref_model = load_for_training(config, log=lambda *a, **k: None)
    trainer = build_trainer(config, model, tokenizer, engine, rows, ref_model=ref_model)
    trainer.sampler = InOrder(rows)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"ours{' LoRA' if args.lora else ''}: {trainable / 1e6:.2f}M trainable parameters, engine {args.engine}, "
        f"{torch.get_num_threads()} threads")  # fmt: skip
    steps, phases, tokens, prompt_tokens = [], [], [], []
    for i in range(args.steps):
        start = time.perf_counter()
        metrics, batch = trainer.step()
        prompt_tokens.append(GROUP_SIZE * sum(len(encode_prompt(tokenizer, r["prompt"]))
                                              for r in rows[i * PROMPTS_PER_STEP : (i + 1) * PROMPTS_PER_STEP]))
        steps.append(time.perf_counter() - start)
        phases.append({
            "generate": metrics.get("time/generate", 0.0), "reward": metrics.get("time/score", 0.0),
            "reference": metrics.get("time/reference", 0.0), "train": metrics.get("time/train", 0.0),
            "step": metrics.get("time/step", steps[-1]), "sync": metrics.get("time/weight_sync", 0.0),
        })  # fmt: skip
        tokens.append(float(batch.rollout.lengths.sum()))
        log(f"ours step {i + 1}/{args.steps}: {steps[-1]:.2f} s, {tokens[-1] / batch.rollout.lengths.numel():.1f} "
            f"tokens/completion, reward {metrics.get('reward/mean', float('nan')):.3f}")  # fmt: skip
    used = rows[: args.steps * PROMPTS_PER_STEP]
    print(json.dumps({
        "side": "ours", "lora": args.lora, "engine": args.engine, "steps": steps, "phases": phases,
        "completion_tokens": tokens, "prompt_tokens": prompt_tokens, "matmul_params": matmul_params(model),
        "backend": trainer.backend.name, "precision": args.precision, "sampling_dtype": config.sampling.dtype, "completions_per_step": GROUP_SIZE * PROMPTS_PER_STEP,
        "peak_rss_kib": peak_rss_kib(), "threads": torch.get_num_threads(), "trainable_params": trainable,
        "prompt_digest": prompt_digest([encode_prompt(tokenizer, r["prompt"]) for r in used]),
        "torch": torch.__version__, "imported_trl": "trl" in sys.modules,
    }), flush=True)  # fmt: skip


def matmul_params(model) -> dict:
    """{"layers": weights of the decoder's Linear layers, "head": the output head's} (LoRA adapters not counted):
    a token's forward costs 2 FLOPs per weight it passes."""
    import torch

    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head
    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name)
    return {"layers": layers, "head": head.weight.numel()}


def side_peak(args) -> None:
    """The machine's matmul peak at --threads threads: GFLOP/s of the best of a few 2048^3 matmuls, float32 and
    bfloat16, through oneDNN's linear op and torch.mm (the faster one counts)."""
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(2048, 2048, generator=g).to(dtype) for _ in range(2))
        kernels = [torch.mm, lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")]
        best = 0.0
        for kernel in kernels:
            try:
                kernel(a, b)
            except RuntimeError:  # no oneDNN bfloat16 on this CPU
                continue
            for _ in range(20):  # the best of many: a shared machine preempts some
                start = time.perf_counter()
                kernel(a, b)
                best = max(best, 2 * 2048**3 / (time.perf_counter() - start) / 1e9)
        out[name] = best
    log(f"matmul peak at {args.threads} threads: float32 {out['float32']:.0f}, bfloat16 {out['bfloat16']:.0f} GFLOP/s")
    print(json.dumps({"side": "peak", "gflops": out, "threads": torch.get_num_threads()}), flush=True)


# -- TRL (this part must not import grpo) ---------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        m = re.search(r"\\boxed (\S+)", text)
        return m.group(1).rstrip("$.") if m else None
    i, depth = text.index("{", start) + 1, 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _extract_answer(text: str) -> str | None:
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _eval_node(node):
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}  # fmt: skip
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return ops[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
        return ops[type(node.op)](_eval_node(node.operand))
    raise ValueError("not an arithmetic expression")


def _to_number(text) -> float | None:
    import ast
    import math

    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().strip("$").replace(",", "").replace("\\frac{", "(").replace("}{", ")/(").rstrip(".")
    s = s.replace("}", ")").replace("\\cdot", "*").replace("\\times", "*").replace("×", "*").replace("^", "**")
    if not s or len(s) > 100:
        return None
    try:
        value = _eval_node(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return float(value) if math.isfinite(value) else None


def answer_accuracy(completions, answer, **_) -> list[float | None]:
    """TRL reward: our built-in answer_accuracy (grpo.rewards.builtin), ported. TRL passes conversational
    completions as [{"role": "assistant", "content": text}] and the dataset's columns as keyword arguments."""
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        if ref is None or (isinstance(ref, str) and not ref.strip()):
            out.append(None)
            continue
        given = _extract_answer(text)
        a, b = _to_number(given), _to_number(ref)
        if a is not None and b is not None:
            out.append(float(abs(a - b) <= 1e-6 * max(1.0, abs(b))))
        else:
            out.append(float(given is not None and given.strip() == str(ref).strip()))
    return out


def trl_config(args, output_dir: str):
    """GRPOConfig with the shared settings, checked against the installed TRL's field names."""
    import dataclasses

    import trl

    core = dict(
        output_dir=output_dir, use_cpu=True, bf16=args.precision == "bfloat16", fp16=False, per_device_train_batch_size=GROUP_SIZE * PROMPTS_PER_STEP,
        gradient_accumulation_steps=1, num_generations=GROUP_SIZE, max_completion_length=args.max_new_tokens,
        beta=BETA, learning_rate=LR, max_steps=args.steps, num_iterations=1, loss_type="grpo",
        temperature=TEMPERATURE, top_p=1.0, top_k=0, scale_rewards="group", max_grad_norm=MAX_GRAD_NORM, epsilon=0.2,
        logging_steps=1, report_to="none", save_strategy="no", seed=args.seed, use_vllm=False,
    )  # fmt: skip
    matching = dict(  # TRL defaults that differ from ours, set to ours (see the docstring)
        gradient_checkpointing=False, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99,
        weight_decay=0.0, use_bias_correction_kl=False, shuffle_dataset=False, disable_dropout=True,
        mask_truncated_completions=False, disable_tqdm=True, dataloader_pin_memory=False,
        model_init_kwargs={"dtype": "float32"},
    )  # fmt: skip
    if args.checkpointing:  # TRL's own default: activation checkpointing on
        del matching["gradient_checkpointing"]
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    if "activation_checkpointing" in fields and "gradient_checkpointing" in matching:  # transformers 5.x renamed it
        matching["activation_checkpointing"] = matching.pop("gradient_checkpointing")
    missing = [k for k in core if k not in fields]
    if missing:
        raise SystemExit(f"TRL {trl.__version__}: GRPOConfig has no field(s) {missing}; adapt trl_config()")
    skipped = [k for k in matching if k not in fields]
    for k in skipped:
        log(f"TRL {trl.__version__}: GRPOConfig has no {k!r}; left at TRL's behaviour")
    return trl.GRPOConfig(**core, **{k: v for k, v in matching.items() if k in fields}), skipped


class Clock:
    """Phase seconds of the current step (TRL side)."""

    def __init__(self):
        self.current: dict[str, float] = {}
        self.prompt_ids: list[list[int]] = []
        self.tokens = 0.0

    def time(self, name: str, fn, *a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start


def side_trl(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import TrainerCallback

    data = json.load(open(args.prompts))
    rows = data["rows"][: args.steps * PROMPTS_PER_STEP]
    clock = Clock()

    class TimedGRPOTrainer(trl.GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            clock.prompt_ids += [list(p) for p in out[0][::GROUP_SIZE]]  # each prompt comes G times in a row
            return out

        def _generate(self, prompts):
            out = clock.time("generate", super()._generate, prompts)
            clock.tokens += sum(len(c) for c in out[1])  # (prompt_ids, completion_ids, ...)
            return out

        def _calculate_rewards(self, *a, **k):
            return clock.time("reward", super()._calculate_rewards, *a, **k)

        def _get_per_token_logps_and_entropies(self, *a, **k):
            if torch.is_grad_enabled():  # the loss's forward: part of "train"
                return super()._get_per_token_logps_and_entropies(*a, **k)
            return clock.time("reference", super()._get_per_token_logps_and_entropies, *a, **k)

    steps, phases, tokens, threads, prompt_tokens = [], [], [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            clock.current, clock.tokens, self.prompts_before = {}, 0.0, len(clock.prompt_ids)
            threads.append(torch.get_num_threads())
            self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            steps.append(time.perf_counter() - self.start)
            p = {k: clock.current.get(k, 0.0) for k in ("generate", "reward", "reference")}
            p["train"] = steps[-1] - sum(p.values())  # everything else: loss forward, backward, clip, AdamW, advantages
            p["step"] = steps[-1]
            phases.append(p)
            tokens.append(clock.tokens)
            prompt_tokens.append(GROUP_SIZE * sum(len(p) for p in clock.prompt_ids[self.prompts_before :]))
            log(f"TRL step {len(steps)}/{args.steps}: {steps[-1]:.2f} s, "
                f"{clock.tokens / (GROUP_SIZE * PROMPTS_PER_STEP):.1f} tokens/completion")  # fmt: skip

    peft_config = None
    if args.lora:
        import peft

        peft_config = peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as out_dir:
        config, skipped = trl_config(args, out_dir)
        trainer = TimedGRPOTrainer(
            model=data["model_folder"], reward_funcs=answer_accuracy, args=config,
            train_dataset=datasets.Dataset.from_list(rows), callbacks=[StepTimer()], peft_config=peft_config,
        )  # fmt: skip
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        log(f"TRL {trl.__version__}{' LoRA' if args.lora else ''}: {trainable / 1e6:.2f}M trainable parameters, "
            f"reference: {'separate model' if trainer.ref_model is not None else 'adapter disabled'}")  # fmt: skip
        trainer.train()
        base = trainer.accelerator.unwrap_model(trainer.model)  # the Trainer enables checkpointing in train()
        layers = [m for m in base.modules() if hasattr(m, "gradient_checkpointing") and m is not base]
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in layers)
    print(json.dumps({
        "side": "trl", "lora": args.lora, "steps": steps, "phases": phases, "completion_tokens": tokens,
        "prompt_tokens": prompt_tokens, "matmul_params": matmul_params(base), "precision": args.precision,
        "completions_per_step": GROUP_SIZE * PROMPTS_PER_STEP, "peak_rss_kib": peak_rss_kib(),
        "threads": min(threads) if threads else torch.get_num_threads(), "trainable_params": trainable,
        "prompt_digest": prompt_digest(clock.prompt_ids), "torch": torch.__version__, "trl": trl.__version__,
        "transformers": transformers.__version__, "config_fields_missing": skipped,
        "activation_checkpointing": checkpointing, "imported_grpo": "grpo" in sys.modules,
    }), flush=True)  # fmt: skip


# -- orchestrator ---------------------------------------------------------------------------------------


def child_env(with_src: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    src = os.path.join(ROOT, "src")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != src]
    env["PYTHONPATH"] = os.pathsep.join(([src] if with_src else []) + paths)  # TRL's side never sees grpo
    return env


def run_child(python: str, side: str, args, extra: list[str] = ()) -> dict:
    """Run one side in its own process; echo its progress lines; return its JSON line (or an error)."""
    cmd = [python, os.path.abspath(__file__), "--side", side, "--steps", str(args.steps), "--threads",
           str(args.threads), "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
           "--engine", args.engine, *(["--vllm-eager"] if args.vllm_eager else []), "--micro-batch-tokens", str(args.micro_batch_tokens), "--lora-sampling-dtype",
           args.lora_sampling_dtype, "--prompts", args.prompts, *(["--checkpointing"] if args.checkpointing else []),
           *(["--bf16-sampling-policy"] if args.bf16_sampling_policy else []),
           *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(side != "trl", args.threads), cwd=ROOT)  # fmt: skip
    tail: list[str] = []

    def pump():
        for line in proc.stderr:
            if line.startswith(MARK):
                print("   " + line[len(MARK) :].strip(), flush=True)
            tail.append(line)
            del tail[:-60]

    reader = threading.Thread(target=pump)
    reader.start()
    out = proc.stdout.read()
    proc.wait()
    reader.join()
    lines = [line for line in out.splitlines() if line.startswith('{"side"')]  # TRL also prints its logs
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + "".join(tail[-25:]).strip()}
    return json.loads(lines[-1])


def step_flops(result: dict, i: int) -> dict[str, float]:
    """The matmul FLOPs step i's phases need: a forward costs 2 FLOPs per Linear weight per token, over each
    distinct prompt once (a group's G rows share it) and every completion token, the head at completion tokens
    only (attention's own products, ~2% here, left out); generation and the reference are one forward, the
    training step three (forward, input and weight gradients; LoRA: two, the frozen weights get no gradient).
    A side that repeats the prompt per row or pads rows does more work than this: it shows as a lower share."""
    mm = result.get("matmul_params")
    if not mm or not result.get("prompt_tokens"):
        return {}
    p, c = result["prompt_tokens"][i], result["completion_tokens"][i]
    forward = 2 * mm["layers"] * (p / GROUP_SIZE + c) + 2 * mm["head"] * c
    return {"generate": forward, "reference": forward, "train": (2 if result.get("lora") else 3) * forward}


def timed_steps(result: dict) -> list[int]:
    """The indices of a run's timed steps: all but the first (the warm-up), unless it ran one step only."""
    return list(range(1, len(result["steps"]))) or [0]


def summarize(results: list[dict] | None, peak: dict | None = None) -> dict | None:
    """One side's figures over its runs (one per --rounds): the median over every run's timed steps, the largest
    peak RSS, and each run's own median (`rounds`, for the per-round ratios). None when no run finished."""
    runs = [r for r in results or [] if r and "error" not in r]
    if not runs:
        return None
    steps = [(r, i) for r in runs for i in timed_steps(r)]
    phase = {k: statistics.median(r["phases"][i][k] for r, i in steps) for k in runs[0]["phases"][0]}
    rate = (peak or {}).get(runs[0].get("precision", "float32"))
    fraction = {}
    for k in ("generate", "reference", "train"):
        per_step = [(step_flops(r, i).get(k), r["phases"][i][k]) for r, i in steps]
        if rate and all(f and t > 0 for f, t in per_step):
            fraction[k] = statistics.median(f / (t * rate * 1e9) for f, t in per_step)
    return {
        "s_per_step": statistics.median(r["steps"][i] for r, i in steps),
        "rounds": [statistics.median(r["steps"][i] for i in timed_steps(r)) for r in runs],
        "rss_gib": max(r["peak_rss_kib"] for r in runs) / 2**20,
        "phases": phase,
        "peak_fraction": fraction,
        "tokens_per_completion": statistics.mean(r["completion_tokens"][i] / r["completions_per_step"] for r, i in steps),
    }


def round_ratios(ours: dict | None, trl: dict | None) -> str:
    """With --rounds > 1: the lowest and highest of ours/TRL over the rounds, each round's runs side by side in
    time ("-" with one round)."""
    if not ours or not trl or len(trl["rounds"]) < 2 or len(ours["rounds"]) != len(trl["rounds"]):
        return "-"
    each = [o / t for o, t in zip(ours["rounds"], trl["rounds"])]
    return f"{min(each):.2f}x-{max(each):.2f}x"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def side_name(side: str, result: dict | None, args) -> str:
    if side == "trl":
        return "TRL"
    return f"ours {(result or {}).get('backend', side.split()[-1])} ({args.engine})"


def tables(results: dict, args, peak: dict | None = None) -> str:
    lines = [
        "| run | precision | ours backend | TRL s/step | ours s/step | ours/TRL | each round | per completion token "
        "| TRL peak RSS GiB | ours peak RSS GiB | ours/TRL |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (run, precision), sides in results.items():
        t = summarize(sides.get("trl"))
        for side in [k for k in sides if k != "trl"] or ["ours"]:
            o = summarize(sides.get(side))
            ts, os_ = (t or {}).get("s_per_step"), (o or {}).get("s_per_step")
            tm, om = (t or {}).get("rss_gib"), (o or {}).get("rss_gib")
            per_token = ratio(os_ / o["tokens_per_completion"], ts / t["tokens_per_completion"]) if t and o else "-"
            backend = next((r["backend"] for r in sides.get(side) or [] if r and "backend" in r),
                           side.split()[-1]) if side != "ours" else "-"
            lines.append(f"| {run} | {precision} | {backend} | {fmt(ts, '.2f')} | {fmt(os_, '.2f')} | {ratio(os_, ts)} "
                         f"| {round_ratios(o, t)} | {per_token} | {fmt(tm, '.2f')} | {fmt(om, '.2f')} | {ratio(om, tm)} |")  # fmt: skip
    lines += [
        "",
        "ours/TRL below 1.00x: ours takes less time / memory. Peak RSS is each process's ru_maxrss (model, reference, "
        "optimizer state, activations, and the libraries each side loads). The sides sample with different random "
        "streams, so their completions differ in length (last column of the phase table); 'per completion token' "
        "divides each side's s/step by its mean completion length first (pessimistic for ours: TRL pads every row "
        "to the longest completion, so its time hardly depends on the mean length, ours does). "
        + (f"Each side ran {args.rounds} times, taking turns (TRL, then ours, then TRL again ...); s/step is the "
           "median over all their timed steps, 'each round' the lowest and highest ours/TRL of runs made side by "
           "side in time." if args.rounds > 1 else "'each round': with --rounds N, ours/TRL of each round's runs."),
        "",
    ]
    if peak:
        lines += [
            f"Matmul peak of this machine at {args.threads} threads (best 2048^3 matmul, oneDNN or torch.mm): "
            f"float32 {peak['float32']:.0f} GFLOP/s, bfloat16 {peak['bfloat16']:.0f} GFLOP/s. '% peak' is the matmul "
            "FLOPs a phase needs (2 per Linear weight per token, each distinct prompt once and every completion "
            "token, the head at completion tokens only; training 3x a forward) over its seconds times the peak "
            "of its precision.",
            "",
        ]
    lines += [
        "Phase seconds (median of the timed steps), the share of the matmul peak each phase reaches, and mean "
        "completion length:",
        "",
        "| run | precision | side | generate s | reward s | reference s | train s | (of which sync) | step s "
        "| generate % peak | reference % peak | train % peak | tokens/completion |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (run, precision), sides in results.items():
        for side, r in sides.items():
            s = summarize(r, peak)
            if s is None:
                continue
            r = next(x for x in r if x and "error" not in x)
            p, f = s["phases"], s["peak_fraction"]
            pct = " | ".join(fmt(100 * f[k] if k in f else None, ".1f") for k in ("generate", "reference", "train"))
            lines.append(f"| {run} | {precision} | {side_name(side, r, args)} | {p['generate']:.2f} | {p['reward']:.2f} "
                         f"| {p['reference']:.2f} | {p['train']:.2f} | {p.get('sync', 0.0):.2f} | {p['step']:.2f} "
                         f"| {pct} | {s['tokens_per_completion']:.1f} |")  # fmt: skip
    notes = []
    for (run, precision), sides in results.items():
        for side, runs in sides.items():
            for r in runs:
                if r and "error" in r:
                    notes.append(f"- {run}, {precision}, {side}: failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
        finished = [(s, r) for s, runs in sides.items() for r in runs if r and "error" not in r]
        digests = {r.get("prompt_digest") for s, r in finished}
        if len(finished) >= 2:
            same = len(digests) == 1
            notes.append(f"- {run}, {precision}: prompt token ids {'identical on every side' if same else 'DIFFER between the sides'}")
        sampling = {r.get("sampling_dtype") for s, r in finished if s != "trl"}
        if precision == "bfloat16" and sampling == {"bfloat16"}:
            notes.append(f"- {run}, {precision}: ours samples with a bfloat16 copy of the weights (sampling.dtype)")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    parser.add_argument("--no-lora", action="store_true", help="full fine-tuning only")
    parser.add_argument("--precisions", default="float32,bfloat16",
                        help="comma-separated: float32, bfloat16 (ours trainer.precision, TRL bf16=True); each runs "
                             "both sides (default: both precisions; bfloat16 needs a CPU with AVX512-BF16 or AMX)")
    parser.add_argument("--backends", default="cpu_fast,plain",
                        help="comma-separated trainer.backend values for ours, each a row beside the same TRL run")
    parser.add_argument("--bf16-sampling-policy", action="store_true",
                        help="ours in bfloat16: sample with the float32 policy instead of a bfloat16 copy")
    parser.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"))
    parser.add_argument("--ours-python", default=None,
                        help="python of our venv (default: this one; with --engine vllm, .venv-vllm's)")
    parser.add_argument("--engine", choices=["fast", "hf", "vllm"], default="fast", help="our rollout engine")
    parser.add_argument("--vllm-eager", action="store_true", help="--engine vllm without compilation")
    parser.add_argument("--lora-sampling-dtype", default="float32", choices=["float32", "bfloat16", ""],
                        help="ours with LoRA: sampling.dtype, a sampling copy with the adapters merged in "
                             "(float32: the policy's own numbers; empty: sample through the adapters)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient (activation) checkpointing on both sides: TRL's default, ours "
                             "trainer.gradient_checkpointing=true")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024,
                        help="ours: trainer.micro_batch_tokens, the token budget of a micro-batch (0: none)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every side this many times, taking turns (TRL, ours, TRL, ours ...): this host's "
                             "speed drifts by tens of percent within minutes, and turns put each round's runs side "
                             "by side in time; the table adds the range of the per-round ratios")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    parser.add_argument("--side", choices=["ours", "trl", "prompts", "peak"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.precision_list = [p for p in args.precisions.split(",") if p]
    args.backend_list = [b for b in args.backends.split(",") if b]
    if not set(args.precision_list) <= {"float32", "bfloat16"} or not args.precision_list:
        parser.error("--precisions: float32 and/or bfloat16")
    if not set(args.backend_list) <= {"auto", "plain", "cpu_fast"} or not args.backend_list:
        parser.error("--backends: auto, plain and/or cpu_fast")
    if args.ours_python is None:
        vllm_python = os.path.join(ROOT, ".venv-vllm", "bin", "python")
        args.ours_python = vllm_python if args.engine == "vllm" and os.path.exists(vllm_python) else sys.executable
    return args


def main() -> None:
    args = parse_args()
    if args.side:
        return {"ours": side_ours, "trl": side_trl, "prompts": side_prompts, "peak": side_peak}[args.side](args)

    # the orchestrator imports neither torch nor grpo: children inherit a parent's peak RSS in ru_maxrss
    sides = [s for s in ("trl", "ours") if args.only in (None, s)]
    if "trl" in sides and not os.path.exists(args.trl_python):
        sys.exit(f"no TRL python at {args.trl_python}; make it with: python3 -m venv .venv-bench && "
                 ".venv-bench/bin/pip install torch==2.13.0 trl peft  (or pass --trl-python)")  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on these cores distort every number)")
    with tempfile.TemporaryDirectory() as tmp:
        args.prompts = os.path.join(tmp, "prompts.json")
        made = run_child(args.ours_python, "prompts", args)
        if not os.path.exists(args.prompts):
            sys.exit(f"could not write the prompts: {made.get('error', '')}")
        peak = run_child(args.ours_python, "peak", args).get("gflops")
        runs = [("full fine-tuning", [])] + ([] if args.no_lora else [("LoRA r=16", ["--lora"])])
        results: dict[tuple[str, str], dict] = {}
        for precision in args.precision_list:
            for run, extra in runs:
                jobs = [("trl", "trl", [])] if "trl" in sides else []
                jobs += [(f"ours {b}", "ours", ["--backend", b]) for b in args.backend_list] if "ours" in sides else []
                results[run, precision] = {key: [] for key, _, _ in jobs}
                for turn, (key, side, more) in itertools.product(range(args.rounds), jobs):  # round by round
                    print(f"{run}, {precision}, {key}: {args.steps} steps"
                          + (f" (round {turn + 1} of {args.rounds})" if args.rounds > 1 else "") + " ...", flush=True)
                    python = args.trl_python if side == "trl" else args.ours_python
                    r = run_child(python, side, args, [*extra, *more, "--precision", precision])
                    results[run, precision][key].append(r)
                    if "error" in r:
                        print(f"   failed: {r['error'][-2000:]}", flush=True)
                    else:
                        print("   " + json.dumps(r), flush=True)
    versions = next((r for s in results.values() for runs in s.values() for r in runs if r and r.get("trl")), {})
    header = (
        f"GRPO step, {GROUP_SIZE * PROMPTS_PER_STEP} completions ({PROMPTS_PER_STEP} prompts x G={GROUP_SIZE}), "
        f"max {args.max_new_tokens} new tokens, float32 weights on the CPU ({', '.join(args.precision_list)} matmuls), "
        f"{args.threads} threads, ours engine {args.engine}, "
        + (f"median of steps 2-{args.steps} (step 1: warm-up)" if args.steps > 2 else
           "step 2 (step 1: warm-up)" if args.steps == 2 else "step 1 (no warm-up)")
        + (f"; TRL {versions['trl']}, transformers {versions['transformers']}, torch {versions['torch']}" if versions else "")
        + ("; gradient checkpointing on both sides" if args.checkpointing else
           "; no gradient checkpointing on either side")
    )  # fmt: skip
    text = header + "\n\n" + tables(results, args, peak)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
