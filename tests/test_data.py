"""Built-in task and prompt files: seeded, disjoint splits; bad rows named by file, row and column."""

import json

import pytest

from grpo.config import load_config
from grpo.data import DataError, PromptSampler, chat_messages, load_task
from grpo.data.arithmetic import arithmetic_rows


def test_arithmetic_is_seeded_and_splits_never_overlap():
    train, eval_ = arithmetic_rows(2, ["+", "-"], 500, 50, "What is {question}?", seed=3)
    again, _ = arithmetic_rows(2, ["+", "-"], 500, 50, "What is {question}?", seed=3)
    assert train == again and len(train) == 500 and len(eval_) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in eval_}
    row = train[0]
    a, op, b = row["question"].split()
    assert row["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    assert row["prompt"] == f"What is {row['question']}?"


def test_small_problem_space_gives_train_the_rest():
    train, eval_ = arithmetic_rows(1, ["+"], 5000, 20, "{question}", seed=0)
    assert len(eval_) == 20 and len(train) == 80


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_config(path, **extra):
    overrides = ["data.task=file", f"data.train_file={path}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides).data


def test_jsonl_rows_keep_every_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2", "level": 1}])
    task = load_task(file_config(path), ["answer"])
    assert task.train == [{"prompt": "1+1?", "answer": "2", "level": 1}]


def test_missing_column_names_file_row_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl: row 2 has no 'answer' column"):
        load_task(file_config(path), ["answer"])


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="row 2 is not valid JSON"):
        load_task(file_config(path), [])


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="d.jsonl: no rows"):
        load_task(file_config(path), [])


def test_answer_column_is_renamed_for_rewards(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "solution": "7"}])
    task = load_task(file_config(path, **{"data.answer_column": "solution"}), ["answer"])
    assert task.train[0]["answer"] == "7"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "answer": ["1", "2"]}), path)
    assert [r["answer"] for r in load_task(file_config(path), ["answer"]).train] == ["1", "2"]


def test_chat_message_prompts(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": msgs}, {"prompt": 5}])
    with pytest.raises(DataError, match="row 2, column 'prompt'"):
        load_task(file_config(path), [])
    assert chat_messages(msgs, "sys") == msgs
    assert chat_messages("hi", "sys") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]


def test_prompt_sampler_is_seeded_and_resumable():
    rows = [{"i": i} for i in range(5)]
    a = PromptSampler(rows, seed=1)
    first = a.next(7)  # crosses an epoch
    assert sorted(r["i"] for r in first[:5]) == list(range(5))
    b = PromptSampler(rows, seed=1)
    b.next(3)
    state = b.state()
    c = PromptSampler(rows, seed=1)
    c.load_state(state)
    assert c.next(4) == first[3:7]
