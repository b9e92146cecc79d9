"""Issue 27, single process: a checkpoint before the first update resumes exactly (AdamW's state untouched by the
save); extending a run keeps the learning rate continuous; the hf engine samples with the run's `sampling` section
only; the sampler's log-probs are the policy's tempered ones, so a truncating sampler's TIS ratio is 1."""

import json
import math
import warnings

import pytest
import torch

from grpo import checkpoint
from grpo.trainer import Trainer
from test_checkpoint import BASE, VOWELS, assert_same_run, metrics, train  # noqa: F401 (fixtures below)
from trainer_helpers import make_trainer


@pytest.fixture
def args(tiny_model_dir, tmp_path):
    (tmp_path / "rw.py").write_text(VOWELS)
    rewards = f"rewards=[{{name: answer_accuracy}}, {{name: '{tmp_path}/rw.py:vowels', weight: 0.1}}]"
    return [f"model.path={tiny_model_dir}", *BASE, rewards]


# --- 7. a checkpoint before the first update ------------------------------------------------------


def test_saving_a_fresh_optimizer_leaves_it_fresh():
    trainer = make_trainer("algorithm.beta=0")
    state = trainer.state_dict()
    assert not trainer.optimizer.state  # AdamW still holds no step count and no moments
    assert state["optimizer"]["state"] == {} and state["optimizer"]["param_groups"][0]["lr"] == trainer.cfg.trainer.lr
    trainer.load_state_dict(state)
    assert not trainer.optimizer.state


@pytest.fixture
def first_step_skipped(monkeypatch):
    """The guard skips the first step's update (as for a reward that returns NaN on step 1 only)."""
    clip = Trainer.clip_and_step

    def bad_first_step(self, loss=None, bad_reward=None):
        return clip(self, loss, "a bad first step (test)" if self.step_count == 0 else bad_reward)

    monkeypatch.setattr(Trainer, "clip_and_step", bad_first_step)


def test_a_checkpoint_before_the_first_update_resumes_exactly(args, tmp_path, first_step_skipped):
    straight, split = tmp_path / "straight", tmp_path / "split"
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=0", f"output.dir={straight}")
    assert code == 0, err
    assert [m["guard/skipped"] for m in metrics(straight)] == [1, 0, 0]
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=1", f"output.dir={split}",
                         "output.keep_checkpoints=3")
    assert code == 0, err
    assert_same_run(straight, split)  # saving after every step changed nothing
    saved = torch.load(split / "checkpoints" / "step-000001" / "trainer.pt", weights_only=False)
    assert saved["optimizer"]["state"] == {}  # no update yet: nothing but hyperparameters
    for c in checkpoint.list_checkpoints(split)[1:]:  # resume from step 1, as if it were the last checkpoint
        c.path.rename(c.path.with_name(".gone-" + c.path.name))
    (split / "model").rename(split / "model-first")
    code, _, err = train("--resume", split, "trainer.steps=3")
    assert code == 0, err
    assert_same_run(straight, split)  # bitwise


# --- 8. extending a run: the learning rate goes on from where it was ---------------------------------


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def advance(trainer, updates: int) -> list[float]:
    """The learning rates of the next `updates` optimizer steps (the scheduler alone, no update)."""
    lrs = []
    for _ in range(updates):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no update is wanted
            warnings.simplefilter("ignore", UserWarning)
            trainer.scheduler.step()
    return lrs


def test_extending_a_cosine_run_keeps_the_learning_rate_continuous():
    """10 updates planned, 4 done, extended to 20: the cosine goes on from progress 0.4 at update 4 to 1 at
    update 20, linearly in the updates (not restarted over 20, which would jump from 0.65 lr up to 0.90 lr)."""
    common = ["algorithm.beta=0", "trainer.lr=1.0", "trainer.lr_schedule=cosine", "trainer.warmup_steps=2"]
    first = make_trainer(*common, "trainer.steps=10")
    done = advance(first, 4)
    assert done == pytest.approx([1 / 3, 2 / 3, cosine(0.0), cosine(1 / 8)], rel=0, abs=1e-12)
    state = first.state_dict()
    extended = make_trainer(*common, "trainer.steps=20")
    extended.load_state_dict(state)
    lrs = advance(extended, 17)
    start = 2 / 8  # the cosine's progress at update 4: (4 - 2 warmup) / (10 - 2)
    want = [cosine(start + (1 - start) * (s - 4) / 16) for s in range(4, 21)]
    assert lrs == pytest.approx(want, rel=0, abs=1e-12)
    assert lrs[0] == first.optimizer.param_groups[0]["lr"] and lrs[-1] == 0.0  # continuous; 0 at the new end
    assert extended.schedule_note is None  # far from 0: nothing to warn about
    again = make_trainer(*common, "trainer.steps=20")  # a second resume, from a checkpoint of the extended run
    resumed = make_trainer(*common, "trainer.steps=20")
    resumed.load_state_dict(state)
    advance(resumed, 6)
    again.load_state_dict(resumed.state_dict())  # the checkpoint holds the extended schedule
    assert advance(again, 11) == pytest.approx(want[6:], rel=0, abs=1e-12)


def test_extending_a_finished_cosine_run_warns_that_it_trains_at_lr_zero(args, tmp_path):
    run = tmp_path / "r"
    code, _, err = train(*args, "trainer.steps=2", "trainer.lr_schedule=cosine", f"output.dir={run}")
    assert code == 0, err
    code, out, err = train("--resume", run, "trainer.steps=4")
    assert code == 0, err
    assert [m["lr"] for m in metrics(run)] == [1e-3, 0.5e-3, 0.0, 0.0]  # not a cosine restarted over 4 steps
    assert "warning: the cosine learning-rate schedule had reached 0" in out
    assert "goes on from there to 0 at step 4" in out and "model.path=<run>/model" in out
