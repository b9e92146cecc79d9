"""FastEngine against plain `transformers` generate and vLLM: tokens/s side by side, peak memory, this machine's bound.

    python benchmarks/bench_generate.py                       # default model, CPU, 2 threads (~12 min)
    python benchmarks/bench_generate.py --configs 2x8x64 --repeats 1 --no-memory   # ~1 min
    python benchmarks/bench_generate.py --memory-only                        # peak memory only
    python benchmarks/bench_generate.py --engines generate,fast,fast-bf16,vllm,vllm-bf16 \
        --configs 2x8x64,8x8x128,32x8x128 --no-memory --generate-upto 64    # the engine table of the README

A config BxGxT is B prompts x G samples x T max new tokens. `generate` is `model.generate` on each prompt
repeated G times (left padded, do_sample, temperature 1, no top-k/top-p), the way a GRPO trainer calls it;
`fast` is FastEngine with the same settings (`fast-unfused`: decoding through the model's own forward
instead of FusedDecoder, `fused=False`; `fast-unpacked`: with no copy of the weights made for the batch,
`prepack=False`; `fast-mkl`: with PyTorch's default float32 matmul kernel instead of oneDNN's);
`fast-bf16` is FastEngine sampling from a bfloat16 copy of the
weights, and `generate-bf16` is generate on a bfloat16 model, for a like-for-like bf16 ratio.
`vllm` / `vllm-bf16` are our VLLMEngine (sampling.engine=vllm: a vllm.LLM, float32 / bfloat16 weights), each
in a child process of the vLLM virtualenv (--vllm-python, default .venv-vllm: vLLM needs other package
versions than .venv) that keeps its engine between calls, so it takes its turn with the others; --vllm-eager
runs it without compilation (faster start, slower decode).
Tokens/s counts real completion tokens (up to and including EOS) over wall time; engines run in turn, after
a warm-up, with a different seed each repeat. Peak memory comes from one child process per engine.
It prints numbers and ratios and never asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch

QUESTIONS = [
    "What is 23 + 45?",
    "What is 7 * 8?",
    "Name three colors.",
    "What is the capital of France?",
    "Write one sentence about rain.",
    "What is 120 - 37?",
    "List two prime numbers.",
    "How many legs does a spider have?",
]


def load(model_path: str | None, threads: int):
    torch.set_num_threads(threads)
    from grpo.models import load_model, load_tokenizer, resolve_model_folder

    folder = resolve_model_folder(model_path)
    return load_model(folder, "float32", "cpu").eval(), load_tokenizer(folder)


def prompts_for(tokenizer, b: int) -> list[list[int]]:
    out = []
    for q in (QUESTIONS * (b // len(QUESTIONS) + 1))[:b]:
        messages = [{"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
    return out


# -- the engines under test: each returns the number of real completion tokens -----------------------


def make_runners(model, tokenizer, names: list[str]) -> dict:
    from grpo.rollout import FastEngine, SamplingParams
    from grpo.rollout.base import finish_completions
    from grpo.core.logprobs import left_pad
    from grpo.rollout.hf import eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id

    def generate_on(m):
        def run(prompts, g, t, seed):
            ids, attn = left_pad([p for p in prompts for _ in range(g)], pad)  # each prompt repeated G times
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = m.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
                    max_new_tokens=t, pad_token_id=pad, eos_token_id=sorted(eos),
                )  # fmt: skip
            _, mask, _ = finish_completions(out[:, ids.shape[1] :], eos, pad, t)
            return int(mask.sum())

        return run

    def fast_with(**options):
        engine = FastEngine(model, tokenizer, **options)

        def run(prompts, g, t, seed):
            params = SamplingParams(max_new_tokens=t, temperature=1.0)
            return int(engine.generate(prompts, g, params, torch.Generator().manual_seed(seed)).completion_mask.sum())

        return run

    makers = {
        "vllm": lambda: VLLMChild("float32"),
        "vllm-bf16": lambda: VLLMChild("bfloat16"),
        "generate": lambda: generate_on(model),
        "fast": lambda: fast_with(),
        "fast-unfused": lambda: fast_with(fused=False),
        "fast-unpacked": lambda: fast_with(prepack=False),
        "fast-mkl": lambda: fast_with(onednn=False),
        "generate-bf16": lambda: generate_on(copy.deepcopy(model).to(torch.bfloat16)),
        "fast-bf16": lambda: fast_with(dtype="bfloat16"),
    }
    return {name: makers[name]() for name in names}


class VLLMChild:
    """VLLMEngine in a child process of the vLLM virtualenv, answering one generation per request line:
    {"prompts", "g", "t", "seed"} -> {"tokens"} (or {"error"}). The child keeps its engine between calls."""

    args = None  # the command line (set by main): model, threads, vllm python, eager

    def __init__(self, dtype: str):
        a = self.args
        cmd = [a.vllm_python, os.path.abspath(__file__), "--vllm-child", dtype, "--threads", str(a.threads)]
        cmd += (["--model", a.model] if a.model else []) + (["--vllm-eager"] if a.vllm_eager else [])
        env = dict(os.environ, PYTHONPATH=src_path(), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}")  # as many cores as the other engines' threads
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.error = self._reply().get("error")  # the child says "ready" once its engine is up

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        return {"error": f"the vLLM child exited with {self.proc.wait()}"}

    def __call__(self, prompts, g, t, seed) -> int:
        if self.error:
            raise RuntimeError(self.error)
        self.proc.stdin.write(json.dumps({"prompts": prompts, "g": g, "t": t, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["tokens"]


def vllm_child(args) -> None:
    """The child's side of VLLMChild: load the model, start VLLMEngine, answer requests from stdin."""
    try:
        model, tok = load(args.model, args.threads)
        from grpo.rollout import SamplingParams, VLLMEngine

        engine = VLLMEngine(model, tok, dtype=args.vllm_child, enforce_eager=args.vllm_eager)
        print(json.dumps({"ready": engine.describe()}), flush=True)
    except Exception as e:  # noqa: BLE001 -- reported to the parent as this engine's result
        print(json.dumps({"error": f"{type(e).__name__}: {e}"[-500:]}), flush=True)
        return
    for line in sys.stdin:
        req = json.loads(line)
        try:
            params = SamplingParams(max_new_tokens=req["t"], temperature=1.0)
            rollout = engine.generate(req["prompts"], req["g"], params, torch.Generator().manual_seed(req["seed"]))
            print(json.dumps({"tokens": int(rollout.completion_mask.sum())}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"error": f"{type(e).__name__}: {e}"[-500:]}), flush=True)


def time_engines(runners: dict, prompts_b, g: int, t: int, repeats: int) -> dict:
    """name -> (tokens, seconds) summed over the repeats, or an error message; engines take turns within
    each repeat."""
    failed = {}
    for name, run in runners.items():  # warm-up: allocator, kernels, lazy init
        try:
            run(prompts_b[:1], 2, 8, seed=0)
        except RuntimeError as e:  # a vLLM child that could not start or generate (e.g. bf16 on this CPU)
            failed[name] = str(e)
    runners = {name: run for name, run in runners.items() if name not in failed}
    totals = {name: [0, 0.0] for name in runners}
    for r in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            tokens = run(prompts_b, g, t, seed=1 + r)
            totals[name][0] += tokens
            totals[name][1] += time.perf_counter() - start
    return {**{name: tuple(v) for name, v in totals.items()}, **failed}


# -- peak memory: one child process per engine ---------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    """Load, warm up, then run one config while a thread samples RSS; print JSON."""
    model, tok = load(args.model, args.threads)
    b, g, t = parse_config(args.configs.split(",")[-1])
    run = make_runners(model, tok, [args.memory_child])[args.memory_child]
    prompts = prompts_for(tok, b)
    run(prompts[:1], 2, 8, seed=0)
    try:  # hand freed heap back to the system, so that RSS counts only what is in use
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    run(prompts, g, t, seed=1)
    done.set()
    thread.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_before": before, "peak_during": max(peak[0], rss_bytes()), "ru_maxrss": maxrss}))


def measure_memory(args, names: list[str]) -> dict:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--memory-child", name, "--configs", args.configs]
        cmd += ["--threads", str(args.threads)]
        cmd += ["--model", args.model] if args.model else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=src_path()))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        out[name] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
    return out


# -- this machine's bound ----------------------------------------------------------------------------


def best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_rates() -> dict:
    """Peak matmul rate (the better of PyTorch's default kernel and oneDNN's) and memory read rate."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()
    big = torch.randn(64 * 1024 * 1024)  # 256 MiB, far beyond the caches
    flops = 2 * 2048**3

    def onednn(x, w):
        return lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    return {
        "matmul_gflops": flops / min(best_time(lambda: a @ b), best_time(onednn(a, b))) / 1e9,
        "matmul_bf16_gflops": flops / min(best_time(lambda: a16 @ b16), best_time(onednn(a16, b16))) / 1e9,
        "read_gbs": big.numel() * 4 / best_time(lambda: big.sum()) / 1e9,
    }


def model_costs(model) -> dict:
    """FLOPs per decoded token (2 x matmul weights, attention separately) and weight bytes read per step."""
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "weight_params": sum(w.numel() for w in linear),
        "flops_per_token": 2 * sum(w.numel() for w in linear),
        # q.k and p.v: 2 x 2 FLOPs per head dim per cached position, per layer
        "attn_flops_per_token_per_position": 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim,
        # keys and values read per row per cached position, float32
        "kv_bytes_per_position": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4,
        "weight_bytes": sum(w.numel() * w.element_size() for w in linear),
    }


def fused_matmuls_step(model, n: int, dtype: torch.dtype):
    """A function running the weight matmuls of one fused decode step at batch n (FusedDecoder's: q|k|v, o,
    gate|up, down per layer and the head, oneDNN on weights reordered for n rows), or None for a model
    FusedDecoder does not run."""
    from grpo.rollout.decoder import FusedDecoder, unsupported
    from grpo.rollout.engine import _cast_copy

    if unsupported(model) is not None:
        return None
    cfg = model.config
    with torch.inference_mode():
        decoder = FusedDecoder(_cast_copy(model, dtype) if dtype != model.dtype else model, n)
    attn_width = model.model.layers[0].self_attn.o_proj.in_features
    x, a, f = (torch.randn(n, w, dtype=dtype) for w in (cfg.hidden_size, attn_width, cfg.intermediate_size))

    def step():
        for layer in decoder.layers:
            for m in (*layer.qkv, *layer.gate_up):
                m(x)
            layer.o(a, residual=x), layer.down(f, residual=x)
        decoder.head(x)

    return step


def decode_matmul_floor(model, n: int, dtype: torch.dtype) -> float:
    """Seconds for all weight matmuls of one decode step at batch n, nothing else, through the fastest
    kernel FastEngine has: oneDNN on the fused weights of `FusedDecoder` or on the model's own Linear
    weights, reordered for the batch or as they are; PyTorch's default kernel where oneDNN is missing."""
    weights = [m.weight.detach().to(dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(n, w.shape[1], dtype=dtype) for w in weights}

    def steps_over(ws, matmul):
        def step():
            for w, plain in zip(ws, weights):
                matmul(inputs[plain.shape[1]], w, None)
        return step

    candidates = [steps_over(weights, torch.nn.functional.linear)]
    from grpo.backend import onednn

    if onednn.available():
        linear = onednn.matmul_for(weights[0])  # oneDNN's kernel
        candidates.append(steps_over(weights, linear))
        candidates.append(steps_over([onednn.reordered(w, n) for w in weights], linear))
        fused = fused_matmuls_step(model, n, dtype)
        if fused is not None:
            candidates.append(fused)
    with torch.inference_mode():
        return min(best_time(step, 3) for step in candidates)


def roofline_tokens_per_s(costs: dict, rates: dict, n: int, context: float, dtype: torch.dtype) -> float:
    """n / max(compute time, memory time) of one decode step at batch n and the given mean context."""
    bf16 = dtype == torch.bfloat16
    rate = (rates["matmul_bf16_gflops"] if bf16 else rates["matmul_gflops"]) * 1e9
    shrink = 2 if bf16 else 1  # bytes per element: 2 instead of 4
    flops = n * (costs["flops_per_token"] + costs["attn_flops_per_token_per_position"] * context)
    reads = (costs["weight_bytes"] + n * costs["kv_bytes_per_position"] * context) / shrink
    return n / max(flops / rate, reads / (rates["read_gbs"] * 1e9))


# -- main ------------------------------------------------------------------------------------------------


def parse_config(text: str) -> tuple[int, int, int]:
    b, g, t = (int(x) for x in text.lower().split("x"))
    return b, g, t


def src_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join([os.path.join(here, "..", "src"), os.environ.get("PYTHONPATH", "")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf; default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--configs", default="2x8x64,8x8x128", help="comma-separated BxGxT")
    parser.add_argument(
        "--engines", default="generate,fast,fast-unfused,fast-unpacked,fast-mkl,generate-bf16,fast-bf16"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory child processes")
    parser.add_argument("--generate-upto", type=int, default=None,
                        help="run generate / generate-bf16 only for configs of at most this many rows B x G (slow)")
    parser.add_argument("--vllm-python", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                              ".venv-vllm", "bin", "python"))
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without compilation (enforce_eager)")
    parser.add_argument("--no-bound", action="store_true",
                        help="skip the machine's bound (roofline, matmul floor): minutes on a CPU without bf16 matmuls")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    VLLMChild.args = args
    if args.memory_child:
        return memory_child(args)
    if args.vllm_child:
        return vllm_child(args)

    names = args.engines.split(",")
    # children first: Linux carries a parent's peak RSS into ru_maxrss across fork and exec
    memory = {} if args.no_memory else measure_memory(args, [n for n in names if not n.startswith("vllm")])
    if args.memory_only:
        return print_markdown([], memory, None, None, args)
    model, tok = load(args.model, args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {model.config._name_or_path}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on these cores distort every number)")
    rates = None if args.no_bound else machine_rates()
    costs = model_costs(model)
    if rates is not None:
        print(
            f"machine: {rates['matmul_gflops']:.0f} GFLOP/s fp32 matmul (2048^3), {rates['matmul_bf16_gflops']:.0f} bf16, "
            f"{rates['read_gbs']:.1f} GB/s read; model: {costs['weight_params'] / 1e6:.0f}M matmul weights, "
            f"{costs['flops_per_token'] / 1e9:.2f} GFLOP/token + attention, {costs['weight_bytes'] / 1e6:.0f} MB read/step"
        )
    runners = make_runners(model, tok, names)
    rows = []
    for config in args.configs.split(","):
        b, g, t = parse_config(config)
        prompts = prompts_for(tok, b)
        slow = args.generate_upto is not None and b * g > args.generate_upto
        results = time_engines({k: v for k, v in runners.items() if not (slow and k.startswith("generate"))},
                               prompts, g, t, args.repeats)
        base = results["generate"][0] / results["generate"][1] if "generate" in results else None
        fast = results["fast"][0] / results["fast"][1] if isinstance(results.get("fast"), tuple) else None
        n = b * g
        context = sum(map(len, prompts)) / b + t / 2
        floors = {} if rates is None else {dt: n / decode_matmul_floor(model, n, dt) for dt in (torch.float32, torch.bfloat16)}
        for name, result in results.items():
            if isinstance(result, str):  # this engine failed here
                rows.append({"config": config, "engine": name, "error": result})
                print(json.dumps(rows[-1]), flush=True)
                continue
            tokens, seconds = result
            rate = tokens / seconds
            dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
            rows.append(
                {
                    "config": config, "engine": name, "tokens_per_s": rate, "seconds": seconds / args.repeats,
                    "mean_len": tokens / (n * args.repeats), "vs_generate": rate / base if base else float("nan"),
                    "vs_fast": rate / fast if fast else float("nan"),
                    "roofline": roofline_tokens_per_s(costs, rates, n, context, dtype) if rates else float("nan"),
                    "matmul_floor": floors.get(dtype, float("nan")),
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(f"load average after timing: {os.getloadavg()[0]:.2f}")
    print_markdown(rows, memory, rates, costs, args)


def print_markdown(rows, memory, rates, costs, args) -> None:
    if rows:
        print_speed(rows, rates, costs)
    if memory:
        print_memory(memory, args)


def print_speed(rows, rates, costs) -> None:
    print(
        "\n| config BxGxT | engine | tokens/s | vs generate | vs fast | mean length | s/run "
        "| bound tokens/s: roofline / matmul floor | share of the matmul floor |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['engine']} | failed: {r['error'][-200:]} | | | | | | |")
            continue
        print(
            f"| {r['config']} | {r['engine']} | {r['tokens_per_s']:.0f} | {r['vs_generate']:.2f}x | {r['vs_fast']:.2f}x "
            f"| {r['mean_len']:.0f} | {r['seconds']:.1f} | {r['roofline']:.0f} / {r['matmul_floor']:.0f} "
            f"| {r['tokens_per_s'] / r['matmul_floor']:.0%} |"
        )
    if rates is None:
        return
    print(
        f"\nBound: {rates['matmul_gflops']:.0f} GFLOP/s fp32 and {rates['matmul_bf16_gflops']:.0f} GFLOP/s bf16 on a "
        f"2048^3 matmul (best of PyTorch's kernel and oneDNN's), {rates['read_gbs']:.1f} GB/s read (sum of 256 MiB); "
        f"{costs['flops_per_token'] / 1e9:.2f} GFLOP per token in matmuls plus "
        f"{costs['attn_flops_per_token_per_position'] / 1e6:.2f} MFLOP per cached position in attention; "
        f"{costs['weight_bytes'] / 1e6:.0f} MB of fp32 weights read per decode step. Roofline: "
        "N / max(N x FLOPs / matmul rate, (weights + KV cache) bytes / read rate) at batch N = B x G and the run's "
        "mean context, in the engine's dtype. Matmul floor: N / the measured time of the model's own Linear layers "
        "at batch N through the fastest kernel the engine has (oneDNN on FusedDecoder's fused weights or on the "
        "model's own, reordered for the batch or as they are, or PyTorch's), i.e. a decode step with no "
        "attention, sampling or Python; an engine whose rows finish early decodes at smaller batches and can sit "
        "above or below it."
    )


def print_memory(memory, args) -> None:
    config = args.configs.split(",")[-1]
    print(f"\nPeak memory, config {config} (one process per engine; RSS sampled every 2 ms):\n")
    print("| engine | RSS after load + warm-up | peak RSS while sampling | growth | ru_maxrss |")
    print("|---|---:|---:|---:|---:|")
    for name, m in memory.items():
        if "error" in m:
            print(f"| {name} | error: {m['error'][-120:]!r} | | | |")
            continue
        mb = {k: v / 2**20 for k, v in m.items()}
        growth = mb["peak_during"] - mb["rss_before"]
        print(
            f"| {name} | {mb['rss_before']:.0f} MiB | {mb['peak_during']:.0f} MiB | {growth:.0f} MiB "
            f"| {mb['ru_maxrss']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
