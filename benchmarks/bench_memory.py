"""Peak memory of one GRPO training step with a 152k-token vocabulary: ours (trainer.backend=plain) before and
after the lean log-prob path, against Hugging Face TRL's GRPOTrainer at the same settings.

TRL lives in its own virtualenv, as for benchmarks/bench_train.py (made once):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 trl peft

Then (prints the table; it never asserts a figure):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_memory.py                      # 512 and 1024 tokens, ~10 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_memory.py --lengths 64 --cap-gib 4   # smoke test
    PYTHONPATH=src .venv/bin/python benchmarks/bench_memory.py --markdown /tmp/memory.md

The model: a randomly initialised Qwen2-architecture model built in code (memory does not depend on the
weights' values) with Qwen2.5's vocabulary of 151936 tokens and a tied head, but a small body (hidden 128,
2 layers, 4 heads, 2 key-value heads) so that the output head dominates as it does at 1024 tokens on a
real model: the [rows, T, vocab] float32 logits are 8 x 1024 x 151936 x 4 B = 5.0 GB. Its tokenizer is
grpo.testing.tiny_tokenizer filled up to the same vocabulary. Both written once to a temporary folder that
both sides load.

One step on each side, float32 on the CPU, the same settings: one prompt x G = 8 completions (8 rows in one
forward/backward: ours trainer.micro_batch_size=8 and no token budget; TRL per_device_train_batch_size=8),
--lengths new tokens at most (the random model almost never samples EOS, so the completions are that long;
each side reports its mean), temperature 1.0, sampling with our default engine (sampling.engine=fast: one
[rows, vocab] block of logits per step; the hf engine keeps transformers' per-step logits, [rows, T, vocab]
in all, for the sampled tokens' log-probs, and so would dominate here) and with transformers' generate on
TRL's side, beta = 0.04 (a frozen reference model: its log-prob pass is inside the step), one gradient
step per batch (mu = 1, num_iterations = 1), no gradient checkpointing, AdamW.

The sides, each in its own process (peak RSS is the process's ru_maxrss: libraries, model, reference,
AdamW state, the sampling and the step):
- ours before: the plain backend as it was, log-probs from the model's full logits
  (`completion_logprobs_reference`, kept as the reference: the child swaps it back in);
- ours after: the plain backend's lean path (grpo.backend.lean): logits trainer.logprob_chunk_tokens
  (256) tokens at a time, the prompt once per group;
- TRL: GRPOTrainer (TRL computes the [rows, T, vocab] logits for the loss's forward and the reference's).
A side whose resident memory would pass --cap-gib (or leave the machine with less than --floor-gib
available) is stopped there, and its cell says "> cap".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_train import answer_accuracy, child_env  # noqa: E402  (stdlib only at import: TRL's side loads it too)

VOCAB = 151936  # Qwen2.5 / Qwen3
BODY = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
ROWS = 8  # one prompt x G
BETA = 0.04
LR = 1e-6
PROMPT = {"prompt": [{"role": "user", "content": "What is 3 + 4? Reply with only the number."}], "answer": "7",
          "question": "3 + 4"}
MARK = "[bench_memory]"
SIDES = {"before": "ours, before (full logits)", "after": "ours, after (lean)", "trl": "TRL GRPOTrainer"}


def log(text: str) -> None:
    print(f"{MARK} {text}", file=sys.stderr, flush=True)


def rss_gib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- the model folder (our venv) --------------------------------------------------------------------------


def side_model(args) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo.testing import tiny_tokenizer

    tok = tiny_tokenizer(VOCAB)
    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **BODY)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).float().save_pretrained(args.folder)
    tok.save_pretrained(args.folder)


# -- ours ---------------------------------------------------------------------------------------------------


def use_full_logits() -> None:
    """The plain backend's log-probs as they were before the lean path: the reference function."""
    from grpo.backend import plain

    def logprobs(self, model, batch, temperature, with_entropy=False, entropy_grad=False):
        lp, ent = plain.completion_logprobs_reference(model, batch, temperature, with_entropy, entropy_grad)
        return plain.zero_padding(lp, ent, batch)

    plain.PlainBackend.logprobs = logprobs


def side_ours(args) -> None:
    import torch

    from grpo import host

    host.set_up(args.threads, "cpu")  # as `grpo train` sets up a CPU run: threads, the allocator's policy
    from bench_train import InOrder
    from grpo.config import load_config
    from grpo.run import build_trainer, load_for_training

    if args.side == "before":
        use_full_logits()
    values = {
        "model.path": args.folder, "model.dtype": "float32", "model.device": "cpu", "model.threads": args.threads,
        "sampling.group_size": ROWS, "sampling.max_new_tokens": args.length, "sampling.engine": "fast",
        "sampling.temperature": 1.0, "sampling.top_p": 1.0, "sampling.top_k": 0,
        "algorithm.beta": BETA, "algorithm.mu": 1, "trainer.backend": "plain", "trainer.steps": 1,
        "trainer.batch_size": ROWS, "trainer.micro_batch_size": ROWS, "trainer.micro_batch_tokens": None,
        "trainer.gradient_checkpointing": False, "trainer.lr": LR, "trainer.lr_schedule": "constant",
        "trainer.warmup_steps": 0, "eval.before": False, "eval.after": False,
        "output.dir": os.path.join(tempfile.gettempdir(), "bench_memory_unused"), "output.tensorboard": False,
    }  # fmt: skip
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    torch.manual_seed(0)
    model, tokenizer, _, engine, ref_model = load_for_training(config, log=lambda *a, **k: None)
    trainer = build_trainer(config, model, tokenizer, engine, [PROMPT], ref_model=ref_model)
    trainer.sampler = InOrder([PROMPT])
    before = rss_gib()
    start = time.perf_counter()
    _, batch = trainer.step()
    seconds = time.perf_counter() - start
    report(args, before, seconds, float(batch.rollout.lengths.float().mean()), backend=trainer.backend.name)


def report(args, before: float, seconds: float, tokens: float, **extra) -> None:
    import torch

    log(f"{args.side} {args.length}: peak {peak_gib():.2f} GiB, {tokens:.0f} tokens/completion, {seconds:.1f} s")
    print(json.dumps({"side": args.side, "length": args.length, "peak_rss_gib": peak_gib(),
                      "rss_before_step_gib": before,
                      "step_seconds": seconds, "tokens_per_completion": tokens, "torch": torch.__version__,
                      **extra}), flush=True)  # fmt: skip


# -- TRL (never imports grpo) ---------------------------------------------------------------------------------


def side_trl(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import dataclasses

    import datasets
    import trl
    from transformers import TrainerCallback

    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    marks: dict[str, float] = {}

    class Marks(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["before"], marks["start"] = rss_gib(), time.perf_counter()

        def on_step_end(self, *a, **k):
            marks["seconds"] = time.perf_counter() - marks["start"]

    lengths: list[float] = []

    class Counted(trl.GRPOTrainer):
        def _generate(self, prompts):
            out = super()._generate(prompts)
            lengths.extend(len(c) for c in out[1])  # (prompt_ids, completion_ids, ...)
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        config = trl.GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=ROWS,
            gradient_accumulation_steps=1, num_generations=ROWS, max_completion_length=args.length, beta=BETA,
            learning_rate=LR, max_steps=1, num_iterations=1, loss_type="grpo", temperature=1.0, top_p=1.0, top_k=0,
            logging_steps=1, report_to="none", save_strategy="no", seed=0, use_vllm=False,
            lr_scheduler_type="constant", warmup_steps=0, shuffle_dataset=False, disable_dropout=True,
            disable_tqdm=True, dataloader_pin_memory=False, model_init_kwargs={"dtype": "float32"},
            **{checkpointing: False},
        )  # fmt: skip
        trainer = Counted(model=args.folder, reward_funcs=answer_accuracy, args=config,
                          train_dataset=datasets.Dataset.from_list([PROMPT] * 4), callbacks=[Marks()])
        trainer.train()
    report(args, marks["before"], marks["seconds"], sum(lengths) / max(len(lengths), 1), trl=trl.__version__,
           imported_grpo="grpo" in sys.modules)


# -- orchestrator (imports neither torch nor grpo) --------------------------------------------------------------


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def child_rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 2**20
    except OSError:
        return 0.0


def run_child(python: str, side: str, args, length: int | None = None) -> dict:
    """One side in its own process; stopped when its memory passes the cap. Its JSON line, or an error."""
    cmd = [python, os.path.abspath(__file__), "--side", side, "--threads", str(args.threads), "--folder", args.folder,
           *(["--length", str(length)] if length else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(side != "trl", args.threads), cwd=ROOT)  # fmt: skip
    tail: list[str] = []
    out: list[str] = []

    def pump(stream, keep):
        for line in stream:
            if line.startswith(MARK):
                print("   " + line[len(MARK):].strip(), flush=True)
            keep.append(line)
            del keep[:-60]

    readers = [threading.Thread(target=pump, args=(proc.stderr, tail)),
               threading.Thread(target=pump, args=(proc.stdout, out))]
    for r in readers:
        r.start()
    capped, seen = None, 0.0
    while proc.poll() is None:
        seen = max(seen, child_rss_gib(proc.pid))
        if seen > args.cap_gib or mem_available_gib() < args.floor_gib:
            capped = (f"stopped at {seen:.1f} GiB resident (cap {args.cap_gib} GiB, "
                      f"floor {args.floor_gib} GiB available)")
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    for r in readers:
        r.join()
    if capped:
        return {"capped": capped, "seen_gib": seen}
    lines = [line for line in out if line.startswith('{"side"')]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + "".join(tail[-25:]).strip()}
    return json.loads(lines[-1])


def cell(r: dict) -> str:
    if not r:
        return "-"  # not run (--only)
    if "capped" in r:
        return f"> {r['seen_gib']:.1f} (capped)"
    return "failed" if "error" in r else f"{r['peak_rss_gib']:.2f}"


def table(results: dict[int, dict[str, dict]], args) -> str:
    lines = ["| completion tokens | " + " | ".join(f"{SIDES[s]} peak RSS GiB" for s in SIDES) + " | after / before "
             "| after / TRL | step growth GiB (before / after / TRL) | tokens/completion (before / after / TRL) |",
             "|---:|" + "---:|" * (len(SIDES) + 4)]  # fmt: skip
    for length, sides in results.items():
        b, a, t = (sides.get(s, {}) for s in SIDES)
        ok = lambda r: "peak_rss_gib" in r  # noqa: E731
        ratio = lambda x, y: f"{x['peak_rss_gib'] / y['peak_rss_gib']:.2f}x" if ok(x) and ok(y) else (  # noqa: E731
            f"< {x['peak_rss_gib'] / y['seen_gib']:.2f}x" if ok(x) and "capped" in y else "-")
        growth = " / ".join(f"{r['peak_rss_gib'] - r['rss_before_step_gib']:.2f}" if ok(r) else "-" for r in (b, a, t))
        tokens = " / ".join(f"{r['tokens_per_completion']:.0f}" if ok(r) else "-" for r in (b, a, t))
        lines.append(f"| {ROWS} x {length} | {cell(b)} | {cell(a)} | {cell(t)} | {ratio(a, b)} | {ratio(a, t)} "
                     f"| {growth} | {tokens} |")  # fmt: skip
    notes = [f"- {SIDES[s]}, {length} tokens: failed: {r['error'][-400:]}" for length, sides in results.items()
             for s, r in sides.items() if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024", help="completion lengths (new tokens), comma-separated")
    parser.add_argument("--only", default=",".join(SIDES), help="sides to run: before,after,trl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=16.0, help="stop a side whose resident memory passes this")
    parser.add_argument("--floor-gib", type=float, default=1.5, help="stop a side when the machine has less available")
    parser.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"))
    parser.add_argument("--markdown", default=None, help="also write the table to this markdown file")
    parser.add_argument("--side", choices=["model", *SIDES], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return {"model": side_model, "before": side_ours, "after": side_ours, "trl": side_trl}[args.side](args)
    sides = [s for s in args.only.split(",") if s]
    if "trl" in sides and not os.path.exists(args.trl_python):
        sys.exit(f"no TRL python at {args.trl_python}; make it with: python3 -m venv .venv-bench && "
                 ".venv-bench/bin/pip install torch==2.13.0 trl peft  (or pass --trl-python)")  # fmt: skip
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.folder = os.path.join(tmp, "qwen2-152k")
        made = run_child(sys.executable, "model", args)
        if not os.path.exists(os.path.join(args.folder, "config.json")):
            sys.exit(f"could not write the model: {made}")
        for length in [int(x) for x in args.lengths.split(",")]:
            results[length] = {}
            for side in sides:
                print(f"{SIDES[side]}, {ROWS} x {length} tokens ...", flush=True)
                python = args.trl_python if side == "trl" else sys.executable
                results[length][side] = r = run_child(python, side, args, length)
                print("   " + json.dumps(r)[-600:], flush=True)
    trl_version = next((r["trl"] for s in results.values() for r in s.values() if "trl" in r), "?")
    header = (f"One GRPO step, {ROWS} rows (1 prompt x G={ROWS}) in one forward/backward, vocabulary {VOCAB} "
              f"(tied head), "
              f"random Qwen2 body {BODY['num_hidden_layers']} layers x hidden {BODY['hidden_size']}, float32 CPU, "
              f"{args.threads} threads, beta={BETA} (reference pass inside the step), sampling: ours engine fast, TRL "
              f"transformers' generate; TRL {trl_version}. Peak RSS: each side's process ru_maxrss.")  # fmt: skip
    text = header + "\n\n" + table(results, args)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
