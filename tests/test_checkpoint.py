"""Checkpoints and resume on the tiny model through the real command line: an interrupted and resumed
run equals an uninterrupted one bitwise; SIGKILL during saves never loses the newest complete
checkpoint; a resume that changes the training is refused; the numerics guard skips bad steps."""

import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from grpo import checkpoint
from grpo.cli import main
from grpo.trainer import Trainer

VOWELS = '''
def vowels(completions, **kwargs):
    """Differs within every group of the random tiny model, so the weights move."""
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


def nan_first(completions, **kwargs):
    """NaN for every completion (a bug: None would mean "does not apply")."""
    return [float("nan")] * len(completions)
'''

BASE = [
    "trainer.batch_size=8", "trainer.micro_batch_size=4", "sampling.group_size=4", "sampling.max_new_tokens=8",
    "data.digits=1", "data.num_eval=4", "trainer.samples_per_step=2", "trainer.lr=1e-3", "eval.before=false",
    "eval.after=false", "output.tensorboard=false", "output.report_every=0", "model.threads=1",
]


@pytest.fixture
def args(tiny_model_dir, tmp_path):
    (tmp_path / "rw.py").write_text(VOWELS)
    rewards = f"rewards=[{{name: answer_accuracy}}, {{name: '{tmp_path}/rw.py:vowels', weight: 0.1}}]"
    return [f"model.path={tiny_model_dir}", *BASE, rewards]


def train(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/", "memory/"))} for m in rows]


def weights(folder) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()
    wa, wb = weights(a / "model"), weights(b / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise


@pytest.fixture
def straight(args, tmp_path):
    """Four uninterrupted steps, with pi_ref := pi_theta every 2 steps (so the reference is saved too)."""
    code, _, err = train(*args, "trainer.steps=4", "algorithm.ref_reset_steps=2", f"output.dir={tmp_path / 'straight'}")
    assert code == 0, err
    return tmp_path / "straight"


def test_resume_extends_a_run_exactly(args, tmp_path, straight):
    run = tmp_path / "split"
    code, _, err = train(*args, "trainer.steps=2", "algorithm.ref_reset_steps=2", f"output.dir={run}")
    assert code == 0, err
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2]
    code, out, err = train("--resume", run, "trainer.steps=4")
    assert code == 0, err
    assert "resumed from" in out and "step-000002" in out
    assert_same_run(straight, run)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]


def test_ctrl_c_saves_a_checkpoint_and_the_resume_is_exact(args, tmp_path, straight, monkeypatch):
    """Ctrl-C after step 3 (between the reference resets at 2 and 4): the saved reference must be used."""
    step = Trainer.step

    def step_then_ctrl_c(self):
        out = step(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: step 3 completes
        return out

    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    run, before = tmp_path / "interrupted", signal.getsignal(signal.SIGINT)  # SIG_IGN under `nohup ... &`
    code, out, err = train(*args, "trainer.steps=4", "algorithm.ref_reset_steps=2", f"output.dir={run}")
    assert code == 130 and "resume with: grpo train --resume" in out
    assert signal.getsignal(signal.SIGINT) is before  # the handler is removed again
    ckpt = checkpoint.latest_checkpoint(run)
    assert ckpt.step == 3 and (ckpt.path / "reference.safetensors").is_file()
    assert not (run / "model").exists()
    monkeypatch.setattr(Trainer, "step", step)
    code, _, err = train("--resume", "auto", *args, "trainer.steps=4", "algorithm.ref_reset_steps=2", f"output.dir={run}")
    assert code == 0, err
    assert_same_run(straight, run)


def test_a_second_ctrl_c_quits_at_once(args, tmp_path, monkeypatch):
    step = Trainer.step

    def step_then_two_ctrl_c(self):
        out = step(self)
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)  # asks for a stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt right here
        return out

    monkeypatch.setattr(Trainer, "step", step_then_two_ctrl_c)
    run, before = tmp_path / "r", signal.getsignal(signal.SIGINT)
    code, _, err = train(*args, "trainer.steps=4", "output.checkpoint_every=0", f"output.dir={run}")
    assert code == 130 and "Ctrl-C again to quit at once" in err
    assert checkpoint.list_checkpoints(run) == []  # no time was spent saving
    assert signal.getsignal(signal.SIGINT) is before


def test_checkpoint_folder_loads_with_transformers_and_keeps_the_last_k(args, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r"
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=1", "output.keep_checkpoints=2", f"output.dir={run}")
    assert code == 0, err
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [2, 3]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing temporary left
    ckpt = checkpoint.latest_checkpoint(run)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path / "model")
    final = weights(run / "model")
    assert all(torch.equal(t, final[k]) for k, t in model.state_dict().items() if k in final)
    assert {"trainer.pt", "rng.pt", "config.yaml", "meta.json", "model"} <= {p.name for p in ckpt.path.iterdir()}
    # the run's model/ shares its files with the last checkpoint's (hard links), and outlives it
    shared, own = run / "model" / "model.safetensors", ckpt.path / "model" / "model.safetensors"
    assert shared.stat().st_ino == own.stat().st_ino and shared.stat().st_nlink == 2
    shutil.rmtree(ckpt.path)
    assert shared.stat().st_nlink == 1 and checkpoint.policy_damage(run / "model") is None


def test_resume_refuses_a_changed_config_and_zero_steps(args, tmp_path):
    run = tmp_path / "r"
    assert train(*args, "trainer.steps=1", f"output.dir={run}")[0] == 0
    before = (run / "metrics.jsonl").read_text()
    code, _, err = train("--resume", run, "trainer.lr=0.5", "sampling.group_size=2", "trainer.steps=3")
    assert code == 2 and "Traceback" not in err
    assert "trainer.lr: 0.001 in the checkpoint, 0.5 now" in err and "sampling.group_size: 4 in the checkpoint, 2 now" in err
    code, _, err = train("--resume", run)
    assert code == 2 and "nothing to train" in err and "trainer.steps=2" in err
    code, _, err = train("--resume", tmp_path / "nowhere")
    assert code == 2 and "not a run folder" in err
    code, _, err = train("--resume", run, "--overwrite")
    assert code == 2 and "only one of them" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing of the earlier run lost
    code, _, err = train("--resume", run, "trainer.steps=2", "eval.after=true", "output.keep_checkpoints=1")
    assert code == 0, err  # steps, eval and output fields may change
    assert [m["step"] for m in metrics(run)] == [1, 2]


def test_a_full_disk_keeps_the_previous_checkpoint(args, tmp_path, monkeypatch):
    saves = []
    real_save = torch.save

    def save(obj, f, *a, **kw):  # each checkpoint writes trainer.pt, then rng.pt; the 3rd write fails
        saves.append(f)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run = tmp_path / "r"
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=1", f"output.dir={run}")
    assert code == 2 and "Traceback" not in err
    assert "no space left on device" in err and "step-000001 is intact" in err and f"--resume {run}" in err
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [c.step for c in checkpoint.list_checkpoints(run)] == [1]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    code, _, err = train("--resume", run)
    assert code == 0, err
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]  # step 2's first try was dropped, then redone


def test_sigkill_during_saves_always_leaves_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    """Kill the real command with SIGKILL while it writes checkpoints (each step), at seeded random
    moments; each time the newest complete checkpoint resumes, and the logs read as one run."""
    rng, run = random.Random(7), tmp_path / "r"
    fresh = ["train", f"model.path={tiny_model_dir}", *BASE, "trainer.steps=500", "output.checkpoint_every=1",
             "output.keep_checkpoints=2", "output.save_model=false", f"output.dir={run}", "--quiet"]
    newest = 0
    for attempt in range(3):
        argv = fresh if attempt == 0 else ["train", "--resume", str(run), "--quiet"]
        proc = subprocess.Popen([sys.executable, "-m", "grpo", *argv], stderr=subprocess.PIPE, text=True)
        try:
            kill_during_a_save(proc, run, newest, rng)
        finally:
            proc.kill()
            proc.wait()
        ckpt = checkpoint.latest_checkpoint(run)
        assert ckpt is not None and ckpt.step > newest, proc.stderr.read()
        newest = ckpt.step
    code, _, err = train("--resume", run, f"trainer.steps={newest + 1}")
    assert code == 0, err
    assert [m["step"] for m in metrics(run)] == list(range(1, newest + 2))


def kill_during_a_save(proc, run, newest: int, rng: random.Random) -> None:
    """Wait for a checkpoint beyond `newest`, then for the next save to start; SIGKILL soon after."""
    deadline = time.monotonic() + 120
    folder = checkpoint.checkpoints_dir(run)
    while (c := checkpoint.latest_checkpoint(run)) is None or c.step <= newest:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    while not any(p.name.startswith(".tmp-") for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)


def test_a_nan_reward_skips_steps_and_stops_after_max_bad_steps(args, tmp_path, tiny_model_dir):
    run = tmp_path / "r"
    rewards = f"rewards=[{{name: answer_accuracy}}, {{name: '{tmp_path}/rw.py:nan_first'}}]"
    code, _, err = train(*args, rewards, "trainer.steps=5", "trainer.max_bad_steps=2", f"output.dir={run}")
    assert code == 1 and "Traceback" not in err
    assert "stopped at step 2: 2 steps in a row" in err and "reward 'nan_first' returned NaN/inf for 8 completions" in err
    m = metrics(run)
    assert [x["guard/skipped"] for x in m] == [1, 1] and m[0]["reward/nan_first/nonfinite"] == 8
    ckpt = checkpoint.latest_checkpoint(run)
    assert ckpt.step == 2  # the weights of the last good state (here: the start) are saved
    start, saved = weights(tiny_model_dir), weights(ckpt.path / "model")
    assert all(torch.equal(start[k], saved[k]) for k in saved)


def test_a_nonfinite_loss_is_skipped_and_counted(args, tmp_path, monkeypatch):
    """A NaN loss on step 2 only: no update that step (AdamW state untouched), the run goes on."""
    import grpo.trainer as trainer_module

    aggregate, calls = trainer_module.aggregate, []

    def nan_on_step_2(*a, **kw):
        calls.append(1)
        loss = aggregate(*a, **kw)
        return loss * float("nan") if len(calls) in (3, 4) else loss  # 2 micro-batches a step

    monkeypatch.setattr(trainer_module, "aggregate", nan_on_step_2)
    run = tmp_path / "r"
    code, out, err = train(*args, "trainer.steps=3", f"output.dir={run}")
    assert code == 0, err
    assert "step 2: update skipped: the loss is nan" in out
    m = metrics(run)
    assert [x["guard/skipped"] for x in m] == [0, 1, 0]
    state = torch.load(checkpoint.latest_checkpoint(run).path / "trainer.pt", weights_only=False)
    assert state["skipped_steps"] == 1 and state["bad_steps"] == 0
    first = next(iter(state["optimizer"]["state"].values()))  # keyed by parameter name
    assert int(first["step"]) == 2  # two updates in three steps


def test_rng_states_round_trip():
    import numpy as np

    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == first


def test_config_diff_ignores_only_the_fields_a_resume_may_change():
    saved = {"trainer": {"steps": 2, "lr": 1e-3}, "output": {"dir": "a"}, "eval": {"k": 1}, "rewards": [{"name": "x"}]}
    new = {"trainer": {"steps": 9, "lr": 1e-3}, "output": {"dir": "b"}, "eval": {"k": 4}, "rewards": [{"name": "y"}]}
    assert checkpoint.config_diff(saved, new) == ["  rewards: [{'name': 'x'}] in the checkpoint, [{'name': 'y'}] now"]


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    checkpoint.truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
