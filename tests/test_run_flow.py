"""A new user's run through the real command line on the tiny random model: a run folder used from another
folder (its config.yaml stores absolute paths), a run whose every update the guard skipped, `grpo eval` of a
run without its model/, and a --nproc that does not split the batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = [
    "trainer.batch_size=8", "trainer.micro_batch_size=4", "sampling.group_size=4", "sampling.max_new_tokens=8",
    "trainer.samples_per_step=2", "trainer.lr=1e-3", "output.tensorboard=false", "output.report_every=0",
    "model.threads=1",
]
REWARDS = '''
def vowels(completions, **kwargs):
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


def nan(completions, **kwargs):
    return [float("nan")] * len(completions)
'''


def grpo(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory):
    """A user's folder with a model, prompt files and a reward file, and a 1-step run started in it with every
    path typed relative to it."""
    root = tmp_path_factory.mktemp("project")
    (root / "tiny").symlink_to(tiny_model_dir)
    (root / "data").mkdir()
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 3)]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (root / "my_rewards.py").write_text(REWARDS)
    proc = grpo("train", "model.path=tiny", "data.task=file", "data.train_file=data/train.jsonl",
                "data.eval_file=data/eval.jsonl", "rewards=[{name: my_rewards.py:vowels}]", "output.dir=runs/r",
                "trainer.steps=1", *TINY, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_the_run_folder_stores_absolute_paths(project):
    saved = yaml.safe_load((project / "runs" / "r" / "config.yaml").read_text())
    typed = {"model.path": (saved["model"]["path"], "tiny"), "data.train_file": (saved["data"]["train_file"],
             "data/train.jsonl"), "data.eval_file": (saved["data"]["eval_file"], "data/eval.jsonl"),
             "output.dir": (saved["output"]["dir"], "runs/r")}
    for key, (stored, relative) in typed.items():
        assert Path(stored).is_absolute() and Path(stored).resolve() == (project / relative).resolve(), key
    path, fn = saved["rewards"][0]["name"].rsplit(":", 1)
    assert fn == "vowels" and Path(path).resolve() == (project / "my_rewards.py").resolve()


def test_the_evaluations_keep_every_completion(project):
    """10 held-out problems: eval_before.json and eval_after.json hold all 10 completions, in the file's order."""
    prompts = [json.loads(line)["prompt"] for line in (project / "data" / "eval.jsonl").read_text().splitlines()]
    for name in ("eval_before.json", "eval_after.json"):
        examples = json.loads((project / "runs" / "r" / name).read_text())["examples"]
        assert [ex["prompt"] for ex in examples] == prompts and all(isinstance(ex["completion"], str) for ex in examples)


def test_eval_and_resume_of_a_run_work_from_another_folder(project, tmp_path):
    run = project / "runs" / "r"
    copy = tmp_path / "r"  # resumed in a copy: the other tests keep the 1-step run
    shutil.copytree(run, copy, symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = grpo("eval", run, "--output", tmp_path / "eval.json", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["num_problems"] == 10
    proc = grpo("train", "--resume", copy, "trainer.steps=2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps(copy) == [1, 2]


def test_eval_of_a_run_without_its_model_says_how_to_get_it_back(project, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(project / "runs" / "r", run, symlinks=True)
    shutil.rmtree(run / "model")
    proc = grpo("eval", run)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{run / 'model'} is missing" in proc.stderr and f"grpo train --resume {run}" in proc.stderr
    assert f"--model {run / 'checkpoints' / 'step-000001' / 'model'}" in proc.stderr
    proc = grpo("train", "--resume", run)  # what the message says: the finished run's model/ written again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "config.json").is_file() and steps(run) == [1]
    assert grpo("eval", run).returncode == 0


def test_eval_of_a_run_that_saved_no_model_says_how_to_write_one(project, tmp_path):
    run = tmp_path / "r"
    proc = grpo("train", f"model.path={project / 'tiny'}", "data.digits=1", "data.num_eval=4", "eval.before=false",
                "eval.after=false", "output.save_model=false", f"output.dir={run}", "trainer.steps=1", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = grpo("eval", run)
    assert proc.returncode == 2 and "the run does not save one (output.save_model=false)" in proc.stderr
    assert f"`grpo train --resume {run} output.save_model=true`" in proc.stderr
    proc = grpo("train", "--resume", run, "output.save_model=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "config.json").is_file()


def test_a_run_whose_every_update_was_skipped_is_not_a_success(project, tmp_path):
    """Every reward NaN, trainer.steps (2) below trainer.max_bad_steps (3): the guard skipped every update, so
    the run fails, saying so, and writes no model/ that would pass for a trained one."""
    out = tmp_path / "nan"
    proc = grpo("train", f"model.path={project / 'tiny'}", "data.digits=1", "data.num_eval=4", "eval.before=false",
                f"rewards=[{{name: {project / 'my_rewards.py'}:nan}}]", f"output.dir={out}", "trainer.steps=2",
                *TINY)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training made no update" in proc.stderr and "skipped all 2 steps" in proc.stderr
    assert "trained 2 steps" not in proc.stdout and not (out / "model").exists()
    assert steps(out) == [1, 2]  # the steps are logged, and a checkpoint saved, as in any run


def test_nproc_that_does_not_split_the_batch_is_refused_before_launching(tiny_model_dir, tmp_path):
    """3 groups over 2 ranks: said once, by the command, before torchrun starts any rank."""
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *TINY,
                "trainer.batch_size=12", "--nproc", "2", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("do not split evenly over 2 ranks") == 1, proc.stderr
    assert "rank 0 of 2" not in proc.stderr and "torch.distributed" not in proc.stderr
    assert not (tmp_path / "r").exists()
