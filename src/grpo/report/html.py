"""report.html: one self-contained page for a run folder (no network, no JavaScript library).

Reads what the run wrote (config.yaml, metrics.jsonl, samples.jsonl, eval_before.json,
eval_after.json, eval.json) and draws: headline numbers, the held-out evaluation before/after,
curves of every metric over steps (inline SVG), the sampled completions of each step with the
best and worst of each group side by side, and the config. Every piece of model or user text is
HTML-escaped: completions can contain anything, `<script>` included. Files being written by a
running training are read as they are (a half-written last line is skipped).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from html import escape
from pathlib import Path

import yaml

from grpo.files import read_jsonl, write_text_atomic
from grpo.report.svg import fmt, line_chart

REPORT_NAME = "report.html"
MAX_TEXT = 4000  # characters of a completion or prompt shown; the rest is cut with a marker

# (title, metric patterns, what the curve tells you)
CHARTS: list[tuple[str, list[str], str]] = [
    ("Reward", ["reward/mean", "reward/*/mean"], "Mean reward of the step's completions: the weighted total, and each reward function unweighted."),
    ("Reward std", ["reward/std", "reward/*/std"], "Spread of the rewards within the step: GRPO learns only from differences inside a group."),
    ("Accuracy", ["reward/answer_accuracy/mean", "eval/accuracy"], "Training accuracy of the sampled completions, and held-out accuracy of greedy completions: squares before and after training, joined by the evaluations every eval.every steps."),
    ("Held-out reward", ["eval/reward", "eval/reward/*"], "Mean reward of greedy completions of the held-out problems, every eval.every steps: the weighted total and each reward."),
    ("KL to the reference", ["kl/mean"], "Mean per-token k3 KL between the policy and the reference (docs/algorithm.md section 3). It starts at 0 and grows as the policy moves."),
    ("Completion length", ["completion/length_mean", "completion/length_min", "completion/length_max"], "Tokens per completion."),
    ("Completion tokens per step", ["tokens/*"], ""),
    ("Zero-std groups and truncation", ["reward/zero_std_frac", "completion/truncated_frac"], "Groups whose rewards are all equal learn nothing (zero advantage); truncated completions hit max_new_tokens."),
    ("Clip fraction", ["clip/low_frac", "clip/high_frac"], "Share of tokens whose ratio was clipped (below 1-eps_low, above 1+eps_high). 0 when mu = 1."),
    ("Token entropy", ["entropy/mean"], "Mean entropy of the policy's next-token distribution on completion tokens; a fast drop means the policy is collapsing."),
    ("Loss", ["loss"], "Why the loss sits near zero: with mu = 1 the ratio is exactly 1 and advantages are centred within each group, so the policy term averages to ~0 at every step although its gradient is not zero; with beta > 0 what remains is about beta x KL. Watch reward, accuracy and KL, not the loss."),
    ("Gradient norm", ["grad_norm"], "Global gradient norm before clipping (trainer.max_grad_norm)."),
    ("Learning rate", ["lr"], ""),
    ("Phase timings (s)", ["time/*"], "Wall time of each phase of a step."),
    ("Throughput (completion tokens/s)", ["throughput/tokens_per_s", "throughput/generate_*", "throughput/reference_*", "throughput/train_*", "throughput/old_logprobs_*"],
     "Completion tokens per second of the whole step and of the model phases (scoring has its own chart below)."),
    ("Memory (GiB)", ["memory/*"], "The process's resident memory after each step and its peak so far (what running out of memory goes by); on a GPU also the step's peak tensor memory and what PyTorch's caching allocator reserves. The largest rank's under torchrun."),
    ("Episodes", ["env/turns_mean", "env/tool_calls_mean", "env/tool_errors_mean", "env/truncated_frac"],
     "Multi-turn episodes (environment): model turns, tool calls and tool errors per episode, and the share cut by a limit (max_turns, max_tokens, max_new_tokens)."),
    ("Advantage", ["advantage/abs_mean", "ratio/mean"], "Mean |advantage| (0 when every group is all-equal) and the mean policy ratio."),
]


# --- reading the run folder ------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _cut(text: str, n: int = MAX_TEXT) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[:n] + f"\n[... {len(text) - n} more characters]"


def e(text) -> str:
    return escape("" if text is None else str(text), quote=True)


# --- sections ----------------------------------------------------------------------------------


def charts_section(metrics: list[dict], evals: dict[str, dict], total_steps: int | None) -> str:
    keys = list(dict.fromkeys(k for m in metrics for k, v in m.items() if k != "step" and _num(v) is not None))
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    used: set[str] = set()
    cards = []
    for title, patterns, note in CHARTS:
        # a wildcard takes only metrics no earlier chart showed; a metric named exactly is always drawn
        names = [k for p in patterns for k in keys if (k == p or ("*" in p and fnmatch.fnmatchcase(k, p) and k not in used))]
        names = list(dict.fromkeys(names))
        points, curve = {}, None
        if title in ("Accuracy", "Held-out reward"):
            key = "accuracy" if title == "Accuracy" else "reward"
            ends = [p for p in held_out_curve(metrics, evals, key) if p[0] in end_steps(metrics, evals)]
            if ends and (key == "accuracy" or names):  # a reward chart only for runs that evaluated during training
                points["held-out before/after"] = ends
            curve = f"eval/{key}"
        if not names and not points:
            continue
        used.update(names)
        series = {k: [(s, _num(m.get(k))) for s, m in zip(steps, metrics)] for k in names if k != curve}
        if curve in names:  # the evaluations during training, joined to before and after
            series[f"held-out ({curve})"] = held_out_curve(metrics, evals, curve.removeprefix("eval/"))
        cards.append(_chart_card(line_chart(series, title, points=points), note))
    for k in keys:  # whatever else the trainer logs, so no metric is hidden
        if k not in used:
            cards.append(_chart_card(line_chart({k: [(s, _num(m.get(k))) for s, m in zip(steps, metrics)]}, k), ""))
    if not cards:
        return '<section id="curves"><h2>Curves</h2><p class="muted">No steps logged yet.</p></section>'
    return '<section id="curves"><h2>Curves</h2><div class="charts">' + "".join(cards) + "</div></section>"


def end_steps(metrics: list[dict], evals: dict[str, dict]) -> set[int]:
    """The steps at which the evaluations before (0) and after training (the last logged step) are drawn."""
    return {0} | ({max((m.get("step", i + 1) for i, m in enumerate(metrics)), default=0)} if "after" in evals else set())


def held_out_curve(metrics: list[dict], evals: dict[str, dict], key: str = "accuracy") -> list[tuple[int, float]]:
    """(step, value) of every held-out evaluation of a run, in step order: `key` ("accuracy" or "reward") of
    the evaluation before training at step 0, eval/<key> of each step that logged one (eval.every), and of the
    evaluation after training at the last logged step."""
    points = []
    if (v := _num((evals.get("before") or {}).get(key))) is not None:
        points.append((0, v))
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    points += [(s, v) for s, m in zip(steps, metrics) if (v := _num(m.get(f"eval/{key}"))) is not None]
    if (v := _num((evals.get("after") or {}).get(key))) is not None:
        points.append((max(steps, default=0), v))
    return points


def _chart_card(svg: str, note: str) -> str:
    return f'<figure class="card">{svg}' + (f"<figcaption>{e(note)}</figcaption>" if note else "") + "</figure>"


def eval_section(evals: dict[str, dict]) -> str:
    if not evals:
        return ""
    names = list(evals)
    rows = [k for k in ("accuracy", "reward") if any(_num(r.get(k)) is not None for r in evals.values())]
    rows += sorted({k for r in evals.values() for k in r if k.startswith("pass@")})
    rewards = sorted({k for r in evals.values() for k in (r.get("rewards") or {})})
    delta = "before" in evals and "after" in evals
    head = "".join(f"<th>{e(n)}</th>" for n in names) + ("<th>after &minus; before</th>" if delta else "")
    body = []
    for key, get in [(k, lambda r, k=k: r.get(k)) for k in rows] + [
        (f"reward/{k}", lambda r, k=k: (r.get("rewards") or {}).get(k)) for k in rewards
    ] + [("problems", lambda r: r.get("num_problems"))]:
        vals = [_num(get(evals[n])) for n in names]
        cells = "".join(f"<td>{'' if v is None else fmt(round(v, 4))}</td>" for v in vals)
        if delta:
            b, a = _num(get(evals["before"])), _num(get(evals["after"]))
            d = None if a is None or b is None or key == "problems" else a - b
            cls = "" if not d else ("pos" if d > 0 else "neg")
            cells += f'<td class="{cls}">{"" if d is None else f"{d:+.3f}"}</td>'
        body.append(f"<tr><th>{e(key)}</th>{cells}</tr>")
    models = "".join(f"<li>{e(n)}: {e(r['model'])}</li>" for n, r in evals.items() if r.get("model"))
    out = [
        '<section id="eval"><h2>Held-out evaluation</h2>',
        f'<p class="muted">{_eval_note(evals)}</p>',
        f'<table class="num"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
        f"<ul class='muted'>{models}</ul>" if models else "",
        _eval_examples(evals),
        "</section>",
    ]
    return "".join(out)


def _eval_note(evals: dict[str, dict]) -> str:
    """What the eval table holds; accuracy named by the check that decided it (eval.metric or the task's own)."""
    metrics = sorted({r["metric"] for r in evals.values() if r.get("metric")})
    if any(_num(r.get("accuracy")) is not None for r in evals.values()):
        check = f" ({e(', '.join(metrics))})" if metrics else ""
        acc = f"Accuracy: the mean of the task's check of right answers{check} on the greedy completions; pass@k when eval.k &gt; 1. "
    else:
        acc = "No accuracy: the task has no check of right answers (no answer column; eval.metric names a reward to use as one). "
    return acc + "reward: the mean weighted total of the run's rewards; reward/&lt;name&gt;: each reward's mean on the greedy completions."


def _eval_examples(evals: dict[str, dict]) -> str:
    names = [n for n in evals if evals[n].get("examples")]
    if not names:
        return ""
    n = max(len(evals[k]["examples"]) for k in names)
    answers = any(ex.get("answer") is not None for k in names for ex in evals[k]["examples"])
    rows = []
    for i in range(n):
        first = next(evals[k]["examples"][i] for k in names if i < len(evals[k]["examples"]))
        cells = []
        for k in names:
            ex = evals[k]["examples"][i] if i < len(evals[k]["examples"]) else None
            if ex is None:
                cells.append("<td></td>")
                continue
            ok = ex.get("correct")
            mark = '<span class="ok">right</span>' if ok == 1 else ('<span class="bad">wrong</span>' if ok == 0 else "")
            if ok is None and _num(ex.get("reward")) is not None:  # no check of right answers: the reward
                mark = f'<span class="chip">reward {_fmt_or(ex.get("reward"))}</span>'
            body = episode_html(ex["episode"], 600) if ex.get("episode") else f"<pre>{e(_cut(ex.get('completion'), 600))}</pre>"
            cells.append(f"<td>{mark}{body}</td>")
        answer = f"<td>{e(first.get('answer'))}</td>" if answers else ""
        rows.append(f"<tr><td>{prompt_html(first.get('prompt'), 400)}</td>{answer}{''.join(cells)}</tr>")
    head = ("<th>answer</th>" if answers else "") + "".join(f"<th>{e(k)}</th>" for k in names)
    return (
        "<details open><summary>Example problems, side by side</summary>"
        f'<table class="examples"><thead><tr><th>problem</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></details>'
    )


def prompt_html(prompt, n: int = MAX_TEXT) -> str:
    """A prompt as a row of the data holds it: text, or chat messages (a list of {role, content}) shown one
    after another under their roles, not as a Python list."""
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "".join(f'<div class="msg"><span class="role">{e(m.get("role", ""))}</span>'
                       f'<pre>{e(_cut(m["content"], n))}</pre></div>' for m in prompt)
    return f"<pre>{e(_cut(prompt, n))}</pre>"


def samples_section(samples: list[dict]) -> str:
    by_step: dict[int, list[dict]] = {}
    for r in samples:
        by_step.setdefault(int(r.get("step", 0)), []).append(r)
    if not by_step:
        return '<section id="samples"><h2>Sampled completions</h2><p class="muted">No samples written yet.</p></section>'
    steps = sorted(by_step)
    options = "".join(f'<option value="{s}">step {s}</option>' for s in steps)
    blocks = "".join(_step_block(s, by_step[s]) for s in steps)
    nav = (
        '<div class="stepnav"><button type="button" id="prev" title="previous step">&#9664;</button>'
        f'<select id="stepsel">{options}</select>'
        '<button type="button" id="next" title="next step">&#9654;</button>'
        '<label><input type="checkbox" id="showall"> show all steps</label></div>'
    )
    return (
        '<section id="samples"><h2>Sampled completions</h2>'
        '<p class="muted">Per step, each group (one prompt, G completions) with its best and worst completion side by side. '
        "Advantage = (reward - group mean) / group std: positive completions are made more likely.</p>"
        f"{nav}{blocks}</section>"
    )


def _reward_key(r: dict) -> float:
    v = _num(r.get("reward"))
    return -math.inf if v is None else v


def _step_block(step: int, records: list[dict]) -> str:
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(int(r.get("group", 0)), []).append(r)
    parts = [f'<div class="step" data-step="{step}"><h3>step {step}</h3>']
    for g, recs in sorted(groups.items()):
        ranked = sorted(recs, key=_reward_key, reverse=True)  # stable: ties keep the written order
        best, worst = ranked[0], ranked[-1]
        prompt = str(recs[0].get("prompt", ""))
        tail = " ".join(prompt.split())[-140:]
        parts.append(f'<div class="group"><details class="prompt"><summary>group {g} &middot; prompt: &hellip;{e(tail)}</summary><pre>{e(_cut(prompt))}</pre></details>')
        pair = [(best, "best")] if best is worst else [(best, "best"), (worst, "worst")]
        parts.append('<div class="pair">' + "".join(_sample_card(r, label) for r, label in pair) + "</div>")
        rest = ranked[1:-1]
        if rest:
            rows = "".join(
                f"<tr><td>{_fmt_or(r.get('reward'))}</td><td>{_adv(r.get('advantage'))}</td><td>{e(r.get('length'))}</td>"
                f"<td><pre>{e(_cut(r.get('completion'), 400))}</pre></td></tr>"
                for r in rest
            )
            parts.append(f'<table class="rest"><thead><tr><th>reward</th><th>advantage</th><th>length</th><th>other completions</th></tr></thead><tbody>{rows}</tbody></table>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _fmt_or(v, none: str = "none") -> str:
    n = _num(v)
    return none if n is None else e(fmt(round(n, 4)))


def _adv(v) -> str:
    n = _num(v)
    if n is None:
        return "none"
    return f'<span class="{"pos" if n > 0 else "neg" if n < 0 else ""}">{n:+.3f}</span>'


def _sample_card(r: dict, label: str) -> str:
    chips = "".join(f'<span class="chip">{e(k)} {_fmt_or(v)}</span>' for k, v in (r.get("rewards") or {}).items())
    trunc = '<span class="chip warn">truncated</span>' if r.get("truncated") else ""
    body = episode_html(r["episode"]) if r.get("episode") else f'<pre class="completion">{e(_cut(r.get("completion")))}</pre>'
    return (
        f'<div class="sample {label}"><div class="meta"><b>{label}</b> reward {_fmt_or(r.get("reward"))} '
        f"&middot; advantage {_adv(r.get('advantage'))} &middot; {e(r.get('length'))} tokens {trunc}</div>"
        f'<div class="chips">{chips}</div>{body}</div>'
    )


def episode_html(episode: dict, n: int = MAX_TEXT) -> str:
    """A multi-turn episode after its prompt: each model turn (with the environment's reward for it) and each
    message the environment answered with, under its role; tool calls and errors counted at the end."""
    messages = episode.get("messages") or []
    rewards = list(episode.get("turn_rewards") or [])
    parts, turn = [], 0
    for m in messages[int(episode.get("first_messages", 0)):]:
        chip = ""
        if m.get("role") == "assistant":
            reward = rewards[turn] if turn < len(rewards) else None
            chip = f' <span class="chip">turn {turn + 1} reward {_fmt_or(reward)}</span>'
            turn += 1
        parts.append(f'<div class="msg"><span class="role">{e(m.get("role", ""))}</span>{chip}'
                     f'<pre>{e(_cut(m.get("content", ""), n))}</pre></div>')
    notes = [f"{episode.get('tool_calls', 0)} tool calls", f"{episode.get('tool_errors', 0)} tool errors"]
    if episode.get("truncated"):
        notes.append("truncated")
    if episode.get("error"):
        notes.append(f"environment error: {_cut(episode['error'], 300)}")
    return f'<div class="episode">{"".join(parts)}<div class="muted">{e(" · ".join(notes))}</div></div>'


def summary_section(metrics: list[dict], evals: dict[str, dict], total_steps: int | None) -> str:
    cards = []

    def card(label, value, sub=""):
        cards.append(f'<div class="stat"><div class="label">{e(label)}</div><div class="value">{value}</div><div class="sub">{sub}</div></div>')

    done = len(metrics)
    card("steps", f"{done}" + (f" / {total_steps}" if total_steps else ""), "finished" if total_steps and done >= total_steps else "in progress")
    if metrics:
        first, last = metrics[0], metrics[-1]
        for key, label in (("reward/mean", "reward mean"), ("reward/answer_accuracy/mean", "train accuracy"), ("kl/mean", "KL")):
            a, b = _num(first.get(key)), _num(last.get(key))
            if b is not None:
                card(label, e(fmt(round(b, 4))), f"step 1: {fmt(round(a, 4))}" if a is not None else "")
        tps = [_num(m.get("throughput/tokens_per_s")) for m in metrics]
        tps = [t for t in tps if t is not None]
        if tps:
            card("tokens/s", f"{sum(tps) / len(tps):.0f}", "completion tokens, mean over steps")
        secs = sum(_num(m.get("time/step")) or 0 for m in metrics)
        card("training time", f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s", "sum of step times")
    if "before" in evals or "after" in evals:  # accuracy where the task has a check, else the mean reward
        key = "accuracy" if any(_num(evals.get(k, {}).get("accuracy")) is not None for k in ("before", "after")) else "reward"
        b, a = (_num(evals.get(k, {}).get(key)) for k in ("before", "after"))
        if b is not None or a is not None:
            card(f"held-out {key}", " &rarr; ".join(fmt(round(x, 4)) for x in (b, a) if x is not None), "before &rarr; after" if b is not None and a is not None else "")
    return '<section class="stats">' + "".join(cards) + "</section>"


# --- the page ----------------------------------------------------------------------------------


def read_evals(run_dir: Path) -> dict[str, dict]:
    """The evaluations of a run folder by name: grpo train writes eval_before/eval_after.json, grpo eval RUN_DIR
    writes eval.json."""
    evals = {}
    for name, file in (("before", "eval_before.json"), ("after", "eval_after.json"), ("eval", "eval.json")):
        if (data := read_json(run_dir / file)) is not None:
            evals[name] = data
    return evals


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report of a run folder."""
    run_dir = Path(run_dir)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    total_steps = (config.get("trainer") or {}).get("steps") if isinstance(config, dict) else None
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    samples = read_jsonl(run_dir / "samples.jsonl")
    evals = read_evals(run_dir)
    tb = run_dir / "tensorboard"
    files = [p.name for p in sorted(run_dir.iterdir()) if p.name != REPORT_NAME] if run_dir.is_dir() else []
    body = [
        f"<header><h1>GRPO run <code>{e(run_dir.name)}</code></h1>",
        f'<p class="muted">{e(str(run_dir.resolve()))} &middot; report written {e(time.strftime("%Y-%m-%d %H:%M:%S"))} '
        "(reload the page to see new steps)</p>",
        '<nav><a href="#curves">curves</a> <a href="#eval">evaluation</a> <a href="#samples">samples</a> <a href="#config">config</a></nav></header>',
        summary_section(metrics, evals, total_steps),
        charts_section(metrics, evals, total_steps),
        eval_section(evals),
        samples_section(samples),
        f'<section id="config"><h2>Config</h2><pre class="config">{e(config_text)}</pre>',
        f"<p class='muted'>Files: {e(', '.join(files))}."
        + (f" TensorBoard: <code>tensorboard --logdir {e(str(tb))}</code>" if tb.is_dir() else "")
        + "</p></section>",
    ]
    title = f"GRPO report: {run_dir.name}"
    return f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head>' \
        f'<body>{"".join(body)}<script>{JS}</script></body></html>\n'


def write_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write <run_dir>/report.html (or `path`) atomically, so a browser never sees half a file."""
    run_dir = Path(run_dir)
    path = Path(path) if path else run_dir / REPORT_NAME
    write_text_atomic(path, build_report(run_dir))
    return path


CSS = re.sub(r"\s+", " ", """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px; padding: 16px 24px; color: #1f2937; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; margin-top: 28px; }
h3 { font-size: 15px; margin: 12px 0 6px; } .muted { color: #6b7280; } nav a { margin-right: 12px; }
code { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 14px; }
.stat { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.stat .label { color: #6b7280; font-size: 12px; } .stat .value { font-size: 20px; font-weight: 600; } .stat .sub { color: #6b7280; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
figure.card { margin: 0; border: 1px solid #e5e7eb; border-radius: 8px; padding: 6px; } svg.chart { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #4b5563; padding: 0 4px 4px; }
svg.chart .ct { font-size: 13px; font-weight: 600; fill: #111827; } svg.chart .tick { font-size: 10px; fill: #6b7280; }
svg.chart .legend { font-size: 10.5px; fill: #374151; } svg.chart .grid { stroke: #f0f0f0; } svg.chart .axis { stroke: #9ca3af; }
svg.chart .frame { fill: none; stroke: #d1d5db; } svg.chart .empty { fill: #9ca3af; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #e5e7eb; padding: 4px 8px; text-align: left; vertical-align: top; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; } thead th { background: #f9fafb; }
.msg .role { font-size: 11px; color: #6b7280; text-transform: uppercase; letter-spacing: .04em; } .msg pre { margin: 2px 0 6px; }
table.examples td { max-width: 380px; } table.examples pre { max-height: 140px; overflow: auto; min-width: 180px; } .pos { color: #15803d; } .neg { color: #b91c1c; }
.ok { color: #15803d; font-weight: 600; } .bad { color: #b91c1c; font-weight: 600; }
.stepnav { position: sticky; top: 0; background: #fff; padding: 6px 0; z-index: 1; display: flex; gap: 6px; align-items: center; }
.group { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; margin: 8px 0; }
details.prompt summary { cursor: pointer; color: #374151; font-size: 12.5px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; margin-top: 6px; }
.sample { border-radius: 6px; padding: 6px 8px; } .sample.best { background: #f0fdf4; border: 1px solid #bbf7d0; }
.sample.worst { background: #fef2f2; border: 1px solid #fecaca; } .sample .meta { font-size: 12.5px; }
.chip { display: inline-block; background: #eef2ff; border-radius: 10px; padding: 0 7px; margin: 2px 4px 2px 0; font-size: 11.5px; }
.chip.warn { background: #fef3c7; } pre.completion { margin-top: 4px; max-height: 320px; overflow: auto; }
table.rest { width: 100%; font-size: 12.5px; } pre.config { background: #f9fafb; padding: 10px; border-radius: 6px; }
""").strip()

# Step browser: show one step's samples at a time (all of them without JavaScript).
JS = """
(function () {
  var sel = document.getElementById('stepsel');
  var all = document.getElementById('showall');
  var blocks = Array.prototype.slice.call(document.querySelectorAll('.step'));
  function show() {
    blocks.forEach(function (b) { b.hidden = !(all.checked || b.getAttribute('data-step') === sel.value); });
  }
  if (sel && all) {
    sel.value = sel.options[sel.options.length - 1].value;
    sel.addEventListener('change', show);
    all.addEventListener('change', show);
    document.getElementById('prev').addEventListener('click', function () { if (sel.selectedIndex > 0) { sel.selectedIndex -= 1; show(); } });
    document.getElementById('next').addEventListener('click', function () { if (sel.selectedIndex < sel.options.length - 1) { sel.selectedIndex += 1; show(); } });
    show();
  }
  document.body.setAttribute('data-ready', '1');
})();
"""
