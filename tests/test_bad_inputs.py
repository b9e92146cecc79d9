"""Every bad input through the real command line: exit 2, one message that names the file, field or row
and says how to fix it, no traceback, raised before the run folder is written, nothing of an earlier run lost.
(A full disk while saving a checkpoint: tests/test_checkpoint.py.)"""

import contextlib
import io
import json
import shutil

import pytest

from grpo.cli import main

QUICK = [
    "trainer.steps=1", "trainer.batch_size=4", "sampling.group_size=2", "sampling.max_new_tokens=4",
    "data.digits=1", "data.num_eval=2", "eval.before=false", "eval.after=false", "output.save_model=false",
    "output.tensorboard=false", "model.threads=1",
]


def train(*argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *map(str, argv)])
    return code, err.getvalue()


def refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error: " in err
    for needle in needles:
        assert needle in err, (needle, err)


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_malformed_yaml_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1, 2\n")
    refused(*train(bad, f"output.dir={tmp_path / 'r'}"), f"{bad}: not valid YAML", "line")
    assert not (tmp_path / "r").exists()


def test_unknown_key_in_a_file_suggests_the_right_one(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainr:\n  steps: 2\nsampling:\n  temprature: 0.7\n")
    refused(*train(cfg), f"invalid config ({cfg})", "trainr: unknown key; did you mean 'trainer'?",
            "sampling.temprature: unknown key; did you mean 'temperature'?")


@pytest.mark.parametrize("override, needle", [
    ("trainer.steps=abc", "trainer.steps: Input should be a valid integer"),
    ("sampling.top_p=2", "sampling.top_p: Input should be less than or equal to 1 (got 2"),
    ("output.keep_checkpoints=0", "output.keep_checkpoints: Input should be greater than or equal to 1"),
    ("trainer.max_bad_steps=0", "trainer.max_bad_steps: Input should be greater than or equal to 1"),
    ("algorithm.ref_reset_steps=2", "ref_reset_steps needs a reference model"),
])
def test_wrong_types_and_ranges(override, needle, tmp_path):
    args = [override, "algorithm.beta=0"] if "ref_reset" in override else [override]
    refused(*train(*args, f"output.dir={tmp_path / 'r'}"), needle)
    assert not (tmp_path / "r").exists()


def test_missing_and_empty_datasets(tmp_path, tiny_model_dir):
    common = [f"model.path={tiny_model_dir}", "data.task=file", f"output.dir={tmp_path / 'r'}", *QUICK]
    refused(*train(*common, f"data.train_file={tmp_path / 'nope.jsonl'}"), "data.train_file: no such file", "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    refused(*train(*common, f"data.train_file={tmp_path / 'empty.jsonl'}"), "empty.jsonl: no rows")
    refused(*train(*common[:-len(QUICK)], *QUICK), "task=file needs data.train_file")
    assert not (tmp_path / "r").exists()


def test_rows_without_the_needed_columns(tmp_path, tiny_model_dir):
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}])
    refused(*train(f"model.path={tiny_model_dir}", "data.task=file", f"data.train_file={data}", f"output.dir={tmp_path / 'r'}", *QUICK),
            "d.jsonl: row 2 has no 'prompt' column (columns: answer, question)")
    data = jsonl(tmp_path / "e.jsonl", [{"prompt": "", "answer": "2"}])
    refused(*train(f"model.path={tiny_model_dir}", "data.task=file", f"data.train_file={data}", f"output.dir={tmp_path / 'r'}", *QUICK),
            "e.jsonl: row 1, column 'prompt'")


def test_a_prompt_longer_than_the_context_is_refused_before_training(tmp_path, tiny_model_dir):
    """The tiny model's context is 512 tokens (one a character; the chat template adds 19)."""
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "x" * 490, "answer": "4"}])
    code, err = train(f"model.path={tiny_model_dir}", "data.task=file", f"data.train_file={data}", f"output.dir={tmp_path / 'r'}",
                      *QUICK, "sampling.max_new_tokens=16")
    refused(code, err, "d.jsonl: row 2: the prompt is 509 tokens", "context of 512 tokens",
            "lower sampling.max_new_tokens to at most 3")
    assert not (tmp_path / "r").exists()
    data = jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "x" * 500, "answer": "4"}])
    code, err = train(f"model.path={tiny_model_dir}", "data.task=file", f"data.train_file={data}", f"output.dir={tmp_path / 'r'}",
                      *QUICK, "sampling.max_new_tokens=16")
    refused(code, err, "d.jsonl: row 2: the prompt alone is 519 tokens and the model's context is 512",
            "shorten that prompt by at least 8 tokens, or drop it")
    assert "max_new_tokens" not in err  # no number of new tokens makes it fit
    code, err = train(f"model.path={tiny_model_dir}", "data.digits=1", f"output.dir={tmp_path / 'r'}", *QUICK,
                      "sampling.max_new_tokens=490")
    refused(code, err, "data.task=arithmetic (train problems): row 1: the prompt is")


def test_a_tokenizer_without_a_chat_template(tmp_path, tiny_model_dir):
    model = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    refused(*train(f"model.path={model}", f"output.dir={tmp_path / 'r'}", *QUICK), "the tokenizer has no chat template")
    assert not (tmp_path / "r").exists()


def test_an_existing_run_folder_is_refused_and_kept(tmp_path, tiny_model_dir):
    run = tmp_path / "r"
    assert train(f"model.path={tiny_model_dir}", f"output.dir={run}", *QUICK)[0] == 0
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    refused(*train(f"model.path={tiny_model_dir}", f"output.dir={run}", *QUICK),
            "already exists", "--overwrite", f"or continue it with --resume {run}")
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert train(f"model.path={tiny_model_dir}", f"output.dir={run}", *QUICK, "--overwrite")[0] == 0


def test_an_unwritable_output_folder(tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("not a folder")
    refused(*train(f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'file' / 'run'}", *QUICK),
            "cannot write the run folder", "is not a writable folder; choose another output.dir")
    refused(*train(f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'file'}", *QUICK), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "not a folder"
