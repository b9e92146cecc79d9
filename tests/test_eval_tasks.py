"""Evaluation of a task grpo does not know: a prompt file with no `answer` column and a reward of the
user's own, through the real CLI on the tiny random model; what cannot work is refused before the model loads."""

import contextlib
import io
import json

import pytest

from grpo.config import load_config

REWARD_FILE = '''
def keyword_len(completion, keyword):
    """Scores the row, not the completion, so its held-out mean is known: len(keyword)."""
    return float(len(keyword))


def is_cat(completion, keyword):
    return 1.0 if keyword == "cat" else 0.0
'''
KEYWORDS = ["cat", "dog", "mouse"]  # keyword_len's mean: (3 + 3 + 5) / 3; is_cat's: 1 / 3
TINY = [
    "trainer.steps=1", "trainer.batch_size=4", "trainer.micro_batch_size=4", "sampling.group_size=2",
    "sampling.max_new_tokens=6", "trainer.samples_per_step=2", "model.threads=null", "output.save_model=false",
]


@pytest.fixture
def user_task(tmp_path, monkeypatch):
    """A folder as a user has it: prompts.jsonl and held_out.jsonl (prompt, keyword; no answer) and
    my_reward.py, with the current directory there so the reward is named by a relative path."""
    rows = "".join(json.dumps({"prompt": f"Say {k}", "keyword": k}) + "\n" for k in KEYWORDS)
    (tmp_path / "prompts.jsonl").write_text(rows)
    (tmp_path / "held_out.jsonl").write_text(rows)
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args):
    from grpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def file_task(tiny_model_dir, *extra):
    return [f"model.path={tiny_model_dir}", "data.task=file", "data.train_file=prompts.jsonl", *TINY, *extra]


def test_custom_reward_without_answer_column_trains_evaluates_and_reports(user_task, tiny_model_dir):
    rewards = "rewards=[{name: my_reward.py:keyword_len, weight: 2.0}]"
    code, out, err = cli("train", *file_task(tiny_model_dir, "data.eval_file=held_out.jsonl", rewards, "output.dir=run"))
    assert code == 0, err
    for name in ("before", "after"):
        result = json.loads((user_task / "run" / f"eval_{name}.json").read_text())
        assert result["accuracy"] is None and result["metric"] is None and "pass@1" not in result
        assert result["rewards"] == {"keyword_len": pytest.approx(11 / 3, abs=1e-6)}
        assert result["reward"] == pytest.approx(22 / 3, abs=1e-6) and result["num_problems"] == 3
        assert result["examples"][0]["correct"] is None and result["examples"][0]["reward"] == 6.0
    table = out[out.index("held-out evaluation"):]
    assert "reward/keyword_len" in table and "accuracy" not in table
    html = (user_task / "run" / "report.html").read_text()
    assert "held-out reward" in html and "<th>accuracy</th>" not in html and "<th>reward/keyword_len</th>" in html

    code, out, err = cli("eval", "run", f"--model={tiny_model_dir}")  # grpo eval on the run folder
    assert code == 0, err
    assert json.loads((user_task / "run" / "eval.json").read_text())["rewards"]["keyword_len"] == pytest.approx(11 / 3, abs=1e-6)
    assert "reward/keyword_len" in out and "accuracy" not in out


def test_eval_metric_reports_a_reward_as_accuracy_with_pass_at_k(user_task, tiny_model_dir):
    rewards = "rewards=[{name: my_reward.py:keyword_len}, {name: my_reward.py:is_cat, label: cat}]"
    code, out, err = cli("eval", *file_task(tiny_model_dir, "data.eval_file=held_out.jsonl", rewards, "eval.metric=cat", "eval.k=2"),
                         "--output", "eval.json")
    assert code == 0, err
    result = json.loads((user_task / "eval.json").read_text())
    assert result["metric"] == "cat" and result["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert result["pass@2"] == pytest.approx(1 / 3, abs=1e-6) and result["rewards"]["cat"] == pytest.approx(1 / 3, abs=1e-6)
    assert "accuracy" in out and "pass@2" in out and "the mean of cat" in out


def test_training_without_an_eval_split_says_so(user_task, tiny_model_dir):
    code, out, err = cli("train", *file_task(tiny_model_dir, "rewards=[{name: my_reward.py:keyword_len}]", "output.dir=run"))
    assert code == 0, err
    assert "training without held-out evaluation" in out and "data.eval_file" in out
    assert not (user_task / "run" / "eval_before.json").exists() and (user_task / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("command, extra, message", [
    ("eval", ["rewards=[{name: my_reward.py:keyword_len}]"], "data.task=file has no held-out split (data.eval_file is not set)"),
    ("train", ["data.eval_file=held_out.jsonl", "rewards=[{name: my_reward.py:keyword_len}]", "eval.k=4"],
     "held_out.jsonl has no 'answer' column: add that column"),  # the file named as the run stores it: absolute
    ("eval", ["data.eval_file=held_out.jsonl", "rewards=[{name: my_reward.py:keyword_len}]", "eval.metric=accuracy"],
     "eval.metric='accuracy' is not the label of one of the rewards; name one of: keyword_len"),
    ("train", ["data.eval_file=held_out.jsonl", "rewards=[{name: my_reward.py:keyword_len}]", "data.answer_column=target"],
     "held_out.jsonl: no row has the column data.answer_column='target'"),
    ("train", ["data.task=arithmetic", "data.digits=1", "data.num_eval=4", "rewards=[{name: my_reward.py:keyword_len}]"],
     "data.task=arithmetic has no 'keyword' column"),
])
def test_what_eval_cannot_do_is_refused_before_the_model_loads(user_task, tiny_model_dir, monkeypatch, command, extra, message):
    import grpo.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(grpo.run, "load_model_and_tokenizer", no_model)
    code, out, err = cli(command, *file_task(tiny_model_dir, *extra, "output.dir=run"))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (user_task / "run").exists()


@pytest.mark.parametrize("task, extra, check", [
    ("arithmetic", [], "answer_accuracy"),
    ("countdown", ["rewards=[{name: countdown}]"], "countdown"),
    ("math", ["data.train_file=rows.jsonl"], "math_accuracy"),
    ("file", ["data.train_file=rows.jsonl"], "answer_accuracy"),  # a file whose rows have an answer
    ("file", ["data.train_file=rows.jsonl", "rewards=[{name: format}]"], None),  # ... and one without
    ("file", ["data.train_file=rows.jsonl", "rewards=[{name: format, label: fmt}]", "eval.metric=fmt"], "fmt"),
])
def test_accuracy_check_of_each_task(task, extra, check, tmp_path, monkeypatch):
    from grpo.evaluate import accuracy_check

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "p", "problem": "p"}) + "\n")
    cfg = load_config(None, [f"data.task={task}", *extra])
    rows = [{"prompt": "p", "answer": "1"}] if check == "answer_accuracy" and task == "file" else [{"prompt": "p"}]
    found = accuracy_check(cfg, rows)
    assert (found and found.name) == check
    assert found is None or (found.reward is None) == (check == "fmt")  # a configured reward is not run twice


def test_eval_table_without_accuracy():
    from grpo.evaluate import format_table

    table = format_table({"before": {"num_problems": 2, "accuracy": None, "reward": 0.5, "rewards": {"r": 0.5}},
                          "after": {"num_problems": 2, "accuracy": None, "reward": None, "rewards": {}}})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["reward", "reward/r", "problems"]
    assert lines[1].split() == ["reward", "0.500", "-"] and lines[2].split() == ["reward/r", "0.500", "-"]
