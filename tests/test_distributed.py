"""Several processes under torchrun (gloo, 2 ranks on this machine's 2 cores, one thread each): the update equals
the single-process one. tests/dist_worker.py runs the steps; the hf engine samples each group under its own seed,
so both sides train on the same rollouts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=ENV)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run of each loss type, computed once."""
    out = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        path = tmp_path_factory.mktemp("single") / f"{loss_type}.pt"
        proc = one_process(str(WORKER), str(path), "ddp", loss_type)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[loss_type] = torch.load(path)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_two_ranks_make_the_single_process_update(single, tmp_path, parallel, loss_type):
    """Same rollouts (each group under its own seed), so the same rewards and advantages; loss, KL and gradient
    norm from global normalizers and summed gradients; the same weights after two AdamW steps (micro-batches of
    3 rows over each rank's 8 completions, so several micro-batches per rank)."""
    path = tmp_path / "two.pt"
    proc = torchrun(str(WORKER), str(path), parallel, loss_type)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = single[loss_type], torch.load(path)
    assert two["world"] == 2 and one["world"] == 1
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert a["completions"] == b["completions"]  # the whole batch, gathered in rank order
        assert a["advantages"] == b["advantages"]
        for key in ("reward/mean", "reward/std", "reward/zero_std_frac", "completion/length_mean"):
            assert a[key] == b[key], key
        for key in ("loss", "kl/mean", "grad_norm", "entropy/mean", "clip/low_frac", "ratio/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=5e-5, msg=name)


def test_bnpo_share_is_its_process_s_token_mean_over_the_number_of_processes():
    """bnpo on W processes: (1/W) * sum over processes of each one's own token mean, so a micro-batch's share
    divides by its process's loss tokens times W (the trainer then undoes DDP's averaging like for every type)."""
    from grpo.core.losses import BatchTotals, aggregate

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    totals = BatchTotals(num_completions=4, num_tokens=9, max_completion_length=3, process_tokens=4, num_processes=2)
    assert float(aggregate(loss, mask, "bnpo", totals)) == pytest.approx(10.0 / (4 * 2), rel=0, abs=1e-7)
    assert float(aggregate(loss, mask, "dapo", totals)) == pytest.approx(10.0 / 9, rel=0, abs=1e-7)


def test_the_batch_std_does_not_depend_on_the_order_of_the_values():
    """scale_rewards=batch gathers the ranks' rewards in rank order, one process has them in its own order: the
    std is of the sorted values, the same to the bit either way."""
    from grpo.core.advantages import outcome_advantages, values_std

    assert float(values_std(torch.tensor([1.0, 2.0, 3.0, 4.0]))) == pytest.approx((5 / 3) ** 0.5, rel=0, abs=1e-12)
    values = torch.rand(101, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e3
    assert all(float(values_std(values[torch.randperm(101, generator=torch.Generator().manual_seed(k))]))
               == float(values_std(values)) for k in range(5))
    assert float(values_std(torch.tensor([2.0]))) == 0.0
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])  # rank 0's 2 groups of 2; the whole batch's std is given
    adv = outcome_advantages(rewards, 2, "batch", eps=0.0, batch_std=torch.tensor(2.0, dtype=torch.float64))
    assert adv.tolist() == [-0.25, 0.25, 0.0, 0.0]


def test_a_padding_micro_batch_is_one_prompt_token_and_one_completion_token():
    from grpo.core.logprobs import build_sequences, padding_micro_batch

    seqs = build_sequences([[5, 6, 7], [8]], torch.tensor([[9, 10], [11, 0], [12, 13], [14, 15]]),
                           torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool), pad_id=0)
    mb = padding_micro_batch(seqs)
    assert mb.rows.tolist() == [0] and mb.sequences.completion_len == 1
    assert mb.sequences.input_ids.tolist() == [[7, 9]] and mb.sequences.attention_mask.tolist() == [[1, 1]]
    assert mb.sequences.position_ids.tolist() == [[2, 3]]


def assert_same_update(one: dict, two: dict, keys=("loss", "kl/mean", "grad_norm", "entropy/mean"),
                       exact_advantages: bool = True) -> None:
    """Two worker outputs made the same steps: the same rollouts and advantages, metrics `keys` and final weights."""
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert a["completions"] == b["completions"]
        if exact_advantages:
            assert a["advantages"] == b["advantages"]
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=5e-5, msg=name)


def run_both(tmp_path, parallel: str, loss_type: str, *args: str, reference: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The worker in one process (with `reference`'s extra flags) and on 2 ranks."""
    proc = one_process(str(WORKER), str(tmp_path / "one.pt"), parallel, loss_type, *args, *reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(str(WORKER), str(tmp_path / "two.pt"), parallel, loss_type, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_ranks_with_different_numbers_of_micro_batches_run_the_same_passes(tmp_path, parallel):
    """Prompts of ~10 and ~340 characters under a budget of 200 tokens: each rank plans its own micro-batches, and
    their numbers differ. FSDP2 gathers the weights in every forward and backward, so the ranks agree on the number
    of passes of each phase (policy, reference, pi_old with mu = 2) and a rank with fewer runs padding passes that
    add nothing: the one-process update. (Before: gloo's "Received data size doesn't match expected size".) top_k
    truncates the sampler's distribution, so pi_old takes a forward pass of its own."""
    one, two = run_both(tmp_path, parallel, "dapo", "--mixed", "trainer.micro_batch_tokens=200", "algorithm.mu=2",
                        "sampling.top_k=50")
    assert_same_update(one, two)


def test_bnpo_on_two_ranks_is_the_mean_of_each_rank_s_own_token_mean(tmp_path):
    """bnpo (docs/algorithm.md section 3): each rank's loss is normalized by its own loss tokens and the gradient is the average of
    the ranks' gradients (TRL's per-device loss under DDP). The reference is computed in one process from the same
    rollouts, by that definition (dist_worker --reference-ranks=2); before, the loss was twice too large."""
    one, two = run_both(tmp_path, "ddp", "bnpo", "--mixed", "trainer.micro_batch_tokens=200",
                        reference=("--reference-ranks=2",))
    assert_same_update(one, two, keys=("loss", "grad_norm"))
    plain = one_process(str(WORKER), str(tmp_path / "dapo.pt"), "ddp", "dapo", "--mixed",
                        "trainer.micro_batch_tokens=200")
    assert plain.returncode == 0, plain.stderr[-3000:]
    dapo = torch.load(tmp_path / "dapo.pt")  # the global token mean: another number, so the test can tell
    assert abs(dapo["steps"][0]["loss"] - two["steps"][0]["loss"]) > 1e-4 * abs(two["steps"][0]["loss"])


@pytest.mark.parametrize("advantage", ["outcome", "process"])
def test_scale_rewards_batch_takes_the_std_of_the_whole_global_batch(tmp_path, advantage):
    """scale_rewards=batch divides by the std of every reward of the global batch (docs/algorithm.md section 2), all ranks' (before:
    each rank's own): the same advantages, to the bit, as one process, and the same update."""
    one, two = run_both(tmp_path, "ddp", "grpo", "algorithm.scale_rewards=batch", f"algorithm.advantage={advantage}",
                        "rewards=[{name: length, args: {target: 6}}, {name: format}]")
    assert_same_update(one, two)



def test_the_plain_backend_s_lean_path_under_ddp_and_fsdp_equals_the_full_logits_reference(tmp_path):
    """tests/dist_lean_worker.py: each rank's 3 rows through the wrapped model (DDP, FSDP2 with the head sharded,
    tied and untied, gradient checkpointing, LoRA) give the one-process full-logits reference's log-probs,
    entropy and whole gradient; the head never saw more than one chunk of 4 tokens, and without checkpointing
    (under DDP and FSDP2) each rank ran its 2 distinct prompts once, packed with the completions into one
    sequence (grpo.backend.packed; under checkpointing: every row's prompt)."""
    proc = torchrun(str(WORKER.with_name("dist_lean_worker.py")), str(tmp_path / "lean"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        for case, r in torch.load(tmp_path / f"lean.{rank}").items():
            for key in ("logprobs", "entropy"):
                torch.testing.assert_close(r[key][0], r[key][1], rtol=1e-4, atol=1e-5, msg=f"{case} {key}")
            ours, ref = r["grads"]
            assert ours.keys() == ref.keys() and ours, case
            for name in ref:
                torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"{case} {name}")
            assert r["head_rows"] <= 4, case  # before: the [3, T + 1, V] logits
            rows = [shape[0] for shape in r["embedded"]]
            assert rows == ([3] if "checkpointing" in case else [1]), (case, r["embedded"])  # [1]: packed


# -- whole runs through the command line ---------------------------------------------------------------------

REWARDS = '''
import os


def vowels(completions, **kwargs):
    """Differs within the groups of the random tiny model, so the weights move."""
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


def noisy_vowels(completions, **kwargs):
    """vowels plus noise from torch's global RNG, drawn once per character and once more per rank number: each
    rank's stream moves by its own amount (the tiny model's completions often all have max_new_tokens
    characters, so the characters alone would move every rank's stream alike), and the ranks' states differ."""
    import torch

    extra = int(os.environ.get("RANK", "0"))
    return [float(sum(c in "aeiou" for c in text)) + float(torch.rand(len(text) + 1 + extra)[-1])
            for text in completions]


def fails_on_rank_1(completions, **kwargs):
    """Raises on rank 1 from its second call on (a reward bug that only one rank's groups reach)."""
    fails_on_rank_1.calls = getattr(fails_on_rank_1, "calls", 0) + 1
    if os.environ.get("RANK") == "1" and fails_on_rank_1.calls >= 2:
        raise ValueError("rank 1's reward failed")
    return [0.0] * len(completions)
'''

RUN = [
    "trainer.batch_size=16", "sampling.group_size=4", "trainer.micro_batch_size=3", "sampling.max_new_tokens=8",
    "sampling.engine=hf", "data.digits=1", "data.num_eval=4", "eval.num_problems=4", "trainer.lr=1e-3",
    "output.tensorboard=false", "output.report_every=0", "model.threads=1", "trainer.samples_per_step=2",
    "eval.batch_size=2",  # two batches of held-out problems: under 2 ranks each evaluates one
]


def grpo(*args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, "-m", "grpo", *map(str, args), *launch], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def metrics(run_dir: Path) -> list[dict]:

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "throughput/", "memory/"))} for x in lines]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(one: dict, many: dict, lr: float) -> None:
    """AdamW divides each gradient element by its own running size, so an element whose gradient is about AdamW's
    eps (1e-8; rows with little signal make many) moves by a part of lr that rounding decides: every element within
    lr / 10, and all but 0.1% of them within 5e-6 (a wrong gradient moves most elements by ~lr)."""
    assert one.keys() == many.keys()
    diff = torch.cat([(many[name] - w).abs().flatten() for name, w in one.items()])
    assert float(diff.max()) <= lr / 10, float(diff.max())
    assert float((diff > 5e-6).float().mean()) <= 1e-3, float((diff > 5e-6).float().mean())


RUN_LR = float(next(o for o in RUN if o.startswith("trainer.lr=")).split("=")[1])


def assert_same_run(a: Path, b: Path, exact: bool = False) -> None:
    """The same metrics, and the same weights: bit for bit (`exact`: the same ranks, the same sums), or up to
    the rounding of sums taken in another order as AdamW magnifies it (assert_same_weights)."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("reward/mean", "reward/std", "completion/length_mean", "advantage/abs_mean"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
        for key in ("loss", "kl/mean", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), key
    wa, wb = weights(a), weights(b)
    if exact:
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=0, msg=name)
    else:
        assert_same_weights(wa, wb, RUN_LR)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "dist_rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, reward_file, tmp_path_factory):
    """3 steps, with a held-out evaluation after step 2 (eval.every): the runs compared with it that evaluate only
    before and after show that evaluating during training changes nothing in it."""
    out = tmp_path_factory.mktemp("one") / "run"
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, "trainer.steps=3",
                "output.checkpoint_every=2", f"rewards=[{{name: {reward_file}:vowels}}]", "eval.every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_run_on_two_ranks_matches_the_single_process_run(single_run, tiny_model_dir, reward_file, tmp_path):
    """`grpo train --nproc 2`: rank 0 alone writes the run folder; both ranks evaluate (before, after step 2 for
    eval.every, after), each its share of the held-out batches; the metrics (reduced over ranks), the evaluations
    and the final weights are the one-process run's."""
    out = tmp_path / "run"
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, "trainer.steps=3",
                "output.checkpoint_every=2", f"rewards=[{{name: {reward_file}:vowels}}]", "eval.every=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(single_run, out)
    curve = [{k: v for k, v in m.items() if k.startswith("eval/")} for m in metrics(out)]
    assert curve == [{k: v for k, v in m.items() if k.startswith("eval/")} for m in metrics(single_run)]
    assert [sorted(c) for c in curve] == [[], ["eval/accuracy", "eval/reward", "eval/reward/vowels"], []]
    for name in ("eval_before.json", "eval_after.json"):  # every completion, as one process
        assert json.loads((out / name).read_text()) == json.loads((single_run / name).read_text()), name
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 2  # one writer: rank 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_two_nodes_on_localhost(single_run, tiny_model_dir, reward_file, tmp_path):
    """--nnodes 2, one process each, a c10d rendezvous on 127.0.0.1: the same run as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = ["-m", "grpo", "train", f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, "trainer.steps=3",
            "output.checkpoint_every=2", f"rewards=[{{name: {reward_file}:vowels}}]"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=grpo-test", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert_same_run(single_run, out)


@pytest.mark.parametrize("first, then, parallel", [(2, 1, "ddp"), (1, 2, "ddp"), (2, 1, "fsdp"), (1, 2, "fsdp")])
def test_a_checkpoint_resumes_on_another_world_size(single_run, tiny_model_dir, reward_file, tmp_path, first, then,
                                                     parallel):
    """Stopped after its step-2 checkpoint on `first` ranks, resumed on `then`: the same run as one that never
    stopped. Two ranks write a sharded checkpoint (torch.distributed.checkpoint, a file per rank), one process a
    whole one; either resumes on the other world size and sharding. With DDP from two ranks the step-2
    checkpoint is damaged (a rank's file cut short): the resume sets it aside and continues from step 1."""
    out = tmp_path / "run"
    damage = first == 2 and parallel == "ddp"
    common = [f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, f"output.checkpoint_every={1 if damage else 2}",
              f"rewards=[{{name: {reward_file}:vowels}}]", f"trainer.parallel={parallel}"]
    proc = grpo("train", *common, "trainer.steps=2", nproc=first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = out / "checkpoints" / "step-000002" / "state"
    if first == 2:
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in state.iterdir()}
        assert not (state.parent / "model").exists()  # the weights are in state/, once
    else:
        assert not state.exists() and (state.parent / "model" / "model.safetensors").is_file()
    if damage:
        shard = state / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = grpo("train", "--resume", out, "trainer.steps=3", f"trainer.parallel={parallel}", nproc=then)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if damage:
        assert "damaged checkpoint" in proc.stdout and "resuming from step-000001" in proc.stdout, proc.stdout
        assert (out / "checkpoints" / "step-000002.damaged").is_dir()
    assert_same_run(single_run, out)


def test_every_rank_resumes_its_own_rng_streams(tiny_model_dir, reward_file, tmp_path):
    """A reward that draws from torch's global RNG as many numbers as its completions have characters: the ranks'
    streams part after the first step. A sharded checkpoint keeps every rank's RNG states and each rank restores its
    own (before: rank 0's, on every rank), so a 2-rank run stopped after step 2 and resumed is the 2-rank run that
    never stopped, rewards included."""
    common = [f"model.path={tiny_model_dir}", *RUN, "output.checkpoint_every=2", "trainer.parallel=ddp",
              f"rewards=[{{name: {reward_file}:noisy_vowels}}]"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = grpo("train", *common, f"output.dir={whole}", "trainer.steps=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = grpo("train", *common, f"output.dir={resumed}", "trainer.steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = grpo("train", "--resume", resumed, "trainer.steps=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(whole, resumed, exact=True)
    saved = torch.load(resumed / "checkpoints" / "step-000002" / "rng.pt", weights_only=False)
    assert len(saved["ranks"]) == 2 and not torch.equal(saved["ranks"][0]["torch"], saved["ranks"][1]["torch"])


def test_a_reset_reference_is_sharded_and_resumed_under_fsdp(tiny_model_dir, reward_file, tmp_path):
    """ref_reset_steps under FSDP2: the sharded reference is reset from the sharded policy, saved in the sharded
    checkpoint and restored: 2 ranks stopped at the reset and resumed give the one-process run."""
    common = [f"model.path={tiny_model_dir}", *RUN, "algorithm.beta=0.04", "algorithm.ref_reset_steps=2",
              "output.checkpoint_every=2", f"rewards=[{{name: {reward_file}:vowels}}]", "trainer.parallel=fsdp"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = grpo("train", *common, f"output.dir={one}", "trainer.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = grpo("train", *common, f"output.dir={two}", "trainer.steps=2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {p.name for p in (two / "checkpoints" / "step-000002" / "state").iterdir()}
    assert "__1_0.distcp" in saved
    proc = grpo("train", "--resume", two, "trainer.steps=3", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["ref_reset"] for m in metrics(one)] == [0.0, 1.0, 0.0]
    kl = [m["kl/mean"] for m in metrics(one)]
    assert kl[1] > 1e-6 and kl[2] == pytest.approx(0, abs=1e-9)  # after the reset the reference is the policy
    assert_same_run(one, two)


def test_a_rank_that_raises_stops_the_job_with_its_error_once(tiny_model_dir, reward_file, tmp_path):
    out = tmp_path / "run"
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, "trainer.steps=4",
                "output.checkpoint_every=1", f"rewards=[{{name: {reward_file}:vowels}}, "
                f"{{name: {reward_file}:fails_on_rank_1}}]", "trainer.dist_timeout_s=60",
                "eval.before=false", nproc=2, timeout=180)  # rank 1's calls are the steps' (it evaluates its share too)
    assert proc.returncode != 0
    assert proc.stderr.count("rank 1's reward failed") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("rank 1's reward failed")[0][-2000:]
    assert (out / "checkpoints" / "step-000001").is_dir()  # what was saved before the failure is kept
    assert len(metrics(out)) == 1


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_on_two_ranks_matches_one_process(tiny_model_dir, reward_file, tmp_path, parallel):
    """LoRA adapters under DDP and FSDP2 (the reference is the base with the adapters off): the one-process
    run's metrics and adapter; under FSDP2 model/ is the whole copy's adapter."""
    common = [f"model.path={tiny_model_dir}", *RUN, "trainer.steps=2", "lora.enabled=true", "lora.r=4",
              "trainer.lr=1e-2", "output.checkpoint_every=0", f"rewards=[{{name: {reward_file}:vowels}}]"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert grpo("train", *common, f"output.dir={one}").returncode == 0
    proc = grpo("train", *common, f"output.dir={two}", f"trainer.parallel={parallel}", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(one / "model" / "adapter_model.safetensors")
    b = load_file(two / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=5e-5, msg=name)
    for x, y in zip(metrics(one), metrics(two)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-7)
        assert y["kl/mean"] == pytest.approx(x["kl/mean"], rel=1e-4, abs=1e-7)


def test_dynamic_sampling_on_two_ranks_fills_every_rank_s_share(tmp_path):
    """DAPO's dynamic sampling: each round draws the groups all ranks still need (every rank's prompt sampler
    stays in the same place), a rank that needs none still takes part; the batch is whole on every step."""
    path = tmp_path / "dyn.pt"
    proc = torchrun(str(WORKER), str(path), "ddp", "dapo", "algorithm.dynamic_sampling=true",
                    "algorithm.max_sampling_rounds=3", "rewards=[{name: format}, {name: length, args: {target: 6}}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in torch.load(path)["steps"]:
        assert len(step["completions"]) == 16
        kept, filled = step["dynamic_sampling/groups_kept"], step["dynamic_sampling/groups_filled"]
        assert kept + filled == 4 and step["dynamic_sampling/groups_drawn"] >= 4
        assert 1 <= step["dynamic_sampling/rounds"] <= 3


def groups(step: dict, size: int) -> list[tuple]:
    """A worker step's groups as (completions, advantages), in the batch's order."""
    c, a = step["completions"], step["advantages"]
    return [(tuple(c[i : i + size]), repr(a[i : i + size])) for i in range(0, len(c), size)]


def test_dynamic_sampling_tops_up_with_the_groups_one_process_takes(tmp_path):
    """When max_sampling_rounds runs out, the batch is topped up with the first dropped groups of the step's draws,
    as one process takes them, even where another rank sampled them (before: each rank its own): the same groups
    (in rank order, not round order) and the same update as one process."""
    one, two = run_both(tmp_path, "ddp", "dapo", "--mixed", "algorithm.dynamic_sampling=true",
                        "algorithm.max_sampling_rounds=3",
                        "rewards=[{name: length, args: {target: 3}}, {name: format}]")
    assert sum(step["dynamic_sampling/groups_filled"] for step in one["steps"]) > 0
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert sorted(groups(a, 4)) == sorted(groups(b, 4))
        for key in ("dynamic_sampling/groups_kept", "dynamic_sampling/groups_filled", "dynamic_sampling/groups_drawn"):
            assert a[key] == b[key], key
        for key in ("loss", "kl/mean", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    for name, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], w, rtol=0, atol=5e-5, msg=name)


def test_the_whole_copy_of_a_bf16_sharded_policy_is_not_pi_old():
    """On CUDA FSDP2 runs the policy's forward in bfloat16 while the engine's whole copy stays in float32: the
    copy's log-probs are then another precision's, and the trainer must compute pi_old itself."""
    from grpo.rollout import FullCopyEngine
    from grpo.rollout import HFGenerateEngine, LogprobKind, SamplingParams
    from grpo.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=0)
    params = SamplingParams(max_new_tokens=4)
    assert FullCopyEngine(HFGenerateEngine(model, tok), model).logprob_kind(params) is LogprobKind.POLICY
    engine = FullCopyEngine(HFGenerateEngine(model, tok), model, reduced_precision=True)
    assert engine.logprob_kind(params) is LogprobKind.OTHER
