"""Watching a run: console modes, metrics.jsonl + TensorBoard with every docs/algorithm.md section 5 metric,
samples every N steps, and the HTML report, opened in headless Chromium when it is installed."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.logging.console import JsonlConsole, LiveConsole, PlainConsole, make_console
from grpo.report import build_report, write_report
from grpo.report.svg import line_chart, nice_ticks, tick_labels

ARTIFACTS = Path(__file__).parent / "artifacts"
EVIL = '<script>alert("x")</script></pre></td><b>bold</b> & "quotes"'

# docs/algorithm.md section 5, as metric names (per-function rewards for the two rewards of the run below)
SPEC_METRICS = [
    "reward/mean", "reward/std", "reward/answer_accuracy/mean", "reward/answer_accuracy/std",
    "reward/test_len/mean", "reward/test_len/std", "reward/zero_std_frac",
    "completion/length_mean", "completion/length_min", "completion/length_max", "completion/truncated_frac",
    "kl/mean", "clip/low_frac", "clip/high_frac", "entropy/mean", "grad_norm", "lr",
    "time/generate", "time/score", "time/reference", "time/train",
    "throughput/generate_tokens_per_s", "throughput/score_tokens_per_s",
    "throughput/reference_tokens_per_s", "throughput/train_tokens_per_s", "throughput/tokens_per_s",
]


def length_reward(prompts, completions, **kwargs):
    """A test reward that differs within groups of the random tiny model."""
    return [float(len(text) % 5) for text in completions]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A 3-step tiny run through the CLI in JSON-lines mode: samples every 2 steps, report every step."""
    from grpo.cli import main
    from grpo.rewards import REWARDS

    REWARDS.setdefault("test_len", length_reward)
    out = tmp_path_factory.mktemp("report") / "run"
    args = [
        "train", f"model.path={tiny_model_dir}", f"output.dir={out}", "trainer.steps=3", "trainer.batch_size=8",
        "trainer.micro_batch_size=8", "sampling.group_size=4", "sampling.max_new_tokens=10", "data.digits=1",
        "data.num_eval=4", "trainer.lr=1e-2", "trainer.samples_every=2", "output.report_every=1", "model.threads=1",
        "rewards=[{name: answer_accuracy}, {name: test_len, weight: 0.2}]", "--log-format", "jsonl",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    (out / "stdout.txt").write_text(stdout.getvalue())
    return out


def test_jsonl_mode_prints_one_json_object_per_step(run_dir):
    lines = (run_dir / "stdout.txt").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # nothing but JSON on stdout
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(SPEC_METRICS) <= set(records[0])


def test_metrics_jsonl_has_every_spec_metric(run_dir):
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        missing = [k for k in SPEC_METRICS if k not in m]
        assert not missing, missing


def test_tensorboard_events_have_every_spec_metric(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    missing = [k for k in SPEC_METRICS if k not in tags]
    assert not missing, missing
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([m["reward/mean"] for m in metrics], rel=1e-6)


def test_samples_written_every_n_steps_and_at_the_last(run_dir):
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 3]
    keys = {"prompt", "completion", "rewards", "reward", "advantage", "length", "truncated"}
    assert all(keys <= set(s) for s in samples)
    assert set(samples[0]["rewards"]) == {"answer_accuracy", "test_len"}


def test_report_of_the_run(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") >= 10 and "Held-out evaluation" in html and "trainer:" in html
    for title in ("Reward", "Accuracy", "KL to the reference", "Completion length", "Clip fraction", "Token entropy",
                  "Zero-std groups and truncation", "Phase timings (s)"):
        assert f">{title}</text>" in html, title
    for name in SPEC_METRICS:  # every metric is drawn (as a legend entry of some chart)
        assert f">{name}</text>" in html, name
    assert 'data-step="2"' in html and 'data-step="3"' in html and 'data-step="1"' not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html


def test_grpo_eval_lands_in_the_report(run_dir):
    from grpo.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", str(run_dir), "--log-format", "plain"]) == 0
    html = (run_dir / "report.html").read_text()
    assert "<th>before</th><th>after</th><th>eval</th>" in html and str(run_dir / "model") in html


def test_report_command(run_dir, tmp_path):
    from grpo.cli import main

    out = tmp_path / "r.html"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(["report", str(run_dir), "--output", str(out)]) == 0
    assert stdout.getvalue().strip() == str(out) and out.read_text().startswith("<!DOCTYPE html>")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in stderr.getvalue()


# --- the report on hand-written run folders ----------------------------------------------------


def fake_run(folder: Path, steps: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"trainer:\n  steps: {steps + 2}\nnote: '{EVIL}'\n")
    with (folder / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "reward/mean": 0.1 * s, "reward/std": 0.5, "kl/mean": 0.01 * s, "loss": 0.0}) + "\n")
        f.write('{"step": 4, "reward/me')  # the line a running training is writing
    samples = [
        {"step": 1, "group": 0, "prompt": "p<0>", "completion": EVIL, "rewards": {"acc": 1.0}, "reward": 1.0, "advantage": 0.87, "length": 9, "truncated": False},
        {"step": 1, "group": 0, "prompt": "p<0>", "completion": "worst one", "rewards": {"acc": None}, "reward": None, "advantage": -0.87, "length": 3, "truncated": True},
        {"step": 1, "group": 0, "prompt": "p<0>", "completion": "middle one", "rewards": {"acc": 0.5}, "reward": 0.5, "advantage": 0.0, "length": 4, "truncated": False},
    ]
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    ex = [{"prompt": "What is 1 + 1?", "answer": "2", "completion": EVIL, "correct": 0.0}]
    (folder / "eval_before.json").write_text(json.dumps({"num_problems": 4, "accuracy": 0.25, "rewards": {"acc": 0.25}, "examples": ex}))
    (folder / "eval_after.json").write_text(json.dumps({"num_problems": 4, "accuracy": 0.5, "rewards": {"acc": 0.5}, "examples": ex}))
    return folder


def test_report_escapes_model_text(tmp_path):
    html = build_report(fake_run(tmp_path / "run"))
    assert "<script>alert" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;/pre&gt;" in html
    assert html.count("<script>") == 1  # only the report's own step browser


def test_report_best_and_worst_side_by_side(tmp_path):
    html = build_report(fake_run(tmp_path / "run"))
    best, worst, middle = html.index('class="sample best"'), html.index('class="sample worst"'), html.index("middle one")
    assert best < worst < middle  # best then worst, the others in a table under them
    assert "&lt;script&gt;" in html[best:worst] and "worst one" in html[worst:middle]
    assert "truncated" in html[worst:middle] and "-0.870" in html and "+0.870" in html


def test_report_eval_table_and_progress(tmp_path):
    html = build_report(fake_run(tmp_path / "run"))
    assert "<th>before</th><th>after</th><th>after &minus; before</th>" in html and "+0.250" in html
    assert "3 / 5" in html and "in progress" in html  # the half-written line is skipped


def test_report_shows_a_chat_prompt_as_messages(tmp_path):
    """A held-out row whose prompt is chat messages (a task from files): each message under its role, not the
    Python repr of a list of dicts."""
    folder = fake_run(tmp_path / "run")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + <2>?"}]
    ex = [{"prompt": chat, "answer": "4", "completion": "4", "correct": 1.0}]
    (folder / "eval_before.json").write_text(json.dumps({"num_problems": 1, "accuracy": 1.0, "examples": ex}))
    html = build_report(folder)
    assert "{&#x27;role&#x27;" not in html and "[{" not in html
    assert ('<div class="msg"><span class="role">system</span><pre>Be brief.</pre></div>'
            '<div class="msg"><span class="role">user</span><pre>What is 2 + &lt;2&gt;?</pre></div>') in html


def test_report_of_an_empty_run_folder(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer: {steps: 2}\n")
    path = write_report(tmp_path)
    assert "No steps logged yet" in path.read_text() and not (tmp_path / "report.html.tmp").exists()


def test_chart_handles_gaps_flat_lines_and_escapes_names():
    svg = line_chart({"a<b>": [(1, 1.0), (2, None), (3, float("nan")), (4, 2.0)], "flat": [(1, 0.0), (4, 0.0)]}, "t&t")
    assert svg.startswith("<svg") and "a&lt;b&gt;" in svg and "t&amp;t" in svg and "nan" not in svg.lower()
    assert "no data yet" in line_chart({"x": [(1, None)]}, "empty")


def test_ticks():
    assert nice_ticks(0, 1, 5) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(-0.06, 1.06, 5) == [0, 0.5, 1.0]
    assert tick_labels([4.618, 4.6185, 4.619]) == ["4.6180", "4.6185", "4.6190"]
    assert tick_labels([0, 50000, 100000, 150000]) == ["0", "5e+04", "1e+05", "1.5e+05"]


# --- console modes ------------------------------------------------------------------------------

STEP = {
    "step": 1, "reward/mean": 0.5, "reward/std": 0.1, "reward/answer_accuracy/mean": 0.25, "kl/mean": 0.001,
    "completion/length_mean": 12.0, "time/step": 2.0, "time/generate": 1.0, "time/train": 0.8,
    "throughput/tokens_per_s": 48.0, "loss": float("nan"),
}


def test_auto_console_is_plain_when_not_a_terminal():
    assert type(make_console("auto", 3, stream=io.StringIO())) is PlainConsole
    with pytest.raises(ValueError, match="valid: auto, live, plain, jsonl, quiet"):
        make_console("fancy", 3)


def test_plain_and_jsonl_consoles():
    out = io.StringIO()
    c = make_console("plain", 3, stream=out)
    with c.training():
        c.step(1, STEP)
    assert out.getvalue().count("\n") == 1 and "step 1/3" in out.getvalue() and "acc 0.25" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    j = JsonlConsole(3, stream=out, err=err)
    j.info("hello")
    with j.progress("evaluating", 4) as update:
        update(4, 4)
    j.step(1, STEP)
    assert json.loads(out.getvalue()) == {**STEP, "loss": None} and "hello" in err.getvalue()
    q = make_console("quiet", 3, stream=out)
    q.info("x")
    q.step(1, STEP)
    assert out.getvalue().count("\n") == 1


def test_live_console_runs_and_prints_each_step():
    out = io.StringIO()
    c = LiveConsole(2, stream=out)
    with c.phase("converting"):
        pass
    with c.progress("evaluating", 4) as update:
        update(2, 4)
    with c.training():
        c.step(1, STEP)
        c.step(2, STEP)
    text = out.getvalue()
    assert "converting: done" in text and "step 1/2" in text and "step 2/2" in text


def test_wandb_missing_is_skipped_with_a_message(monkeypatch, tmp_path):
    from grpo.config import Config
    from grpo.logging.run import start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    messages = []
    assert start_wandb(Config(), tmp_path, messages.append) is None
    assert "not installed (pip install wandb)" in messages[0]


# --- the page in a real browser --------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium is not installed (make test installs it: tests/install_chromium.sh); the browser check is skipped")


def test_report_opens_in_headless_chromium(run_dir, tmp_path):
    """The report of the tiny run, with a hostile completion added, loads without console errors, its
    script runs (it marks <body data-ready>), charts and tables are there; a screenshot is kept."""
    browser = chromium()
    with (run_dir / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "group": 9, "prompt": "p", "completion": EVIL, "rewards": {}, "reward": 0.0,
                            "advantage": 0.0, "length": 1, "truncated": False}) + "\n")
    report = write_report(run_dir)
    url = report.resolve().as_uri()

    def browse(*args):
        return subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url],
            capture_output=True, text=True, timeout=120,
        )

    dom = browse("--enable-logging=stderr", "--v=0", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert 'data-ready="1"' in dom.stdout  # the step browser's script ran to the end
    assert dom.stdout.count("<svg") >= 10 and 'class="sample best"' in dom.stdout and "<table" in dom.stdout
    assert "<script>alert" not in dom.stdout and "&lt;script&gt;alert" in dom.stdout
    shot = tmp_path / "report.png"
    res = browse(f"--screenshot={shot}", "--window-size=1280,2000")
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    shutil.copy(report, ARTIFACTS / "report.html")
