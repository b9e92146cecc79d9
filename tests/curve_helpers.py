"""A tiny-model run with a held-out "accuracy" that moves, shared by the held-out curve and sweep tests."""

import contextlib
import io


def char_score(completions, **kwargs):
    """A test reward in [0, 1] that differs between completions of the random tiny model, also between its greedy
    ones (a character repeated): held-out "accuracy", its mean as eval.metric, moves as the weights do."""
    return [sum(ord(c) % 7 for c in t) / (6 * max(len(t), 1)) for t in completions]


RUN = [
    "trainer.batch_size=8", "trainer.micro_batch_size=8", "sampling.group_size=4", "sampling.max_new_tokens=10",
    "data.digits=1", "data.num_eval=6", "eval.num_problems=5", "trainer.lr=1e-2", "model.threads=1",
    "output.tensorboard=false", "output.report_every=0", "output.checkpoint_every=0",
    "rewards=[{name: answer_accuracy}, {name: test_char_score}]", "eval.metric=test_char_score",
]


def train(tiny_model_dir, out, *extra):
    from grpo.cli import main
    from grpo.rewards import REWARDS

    REWARDS.setdefault("test_char_score", char_score)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", f"model.path={tiny_model_dir}", f"output.dir={out}", *RUN, *extra]) == 0
    return stdout.getvalue()
