"""sweep.html: the page of a `grpo sweep` folder: the table of every seed's held-out result with its mean and
spread, the held-out curves of all seeds on one chart (before, every eval.every steps, after), and each seed's
training reward. Self-contained like report.html; each seed's own report is linked."""

from __future__ import annotations

from pathlib import Path

from grpo.files import read_jsonl, write_text_atomic
from grpo.report.html import CSS, REPORT_NAME, _chart_card, e, held_out_curve, read_evals
from grpo.report.svg import fmt, line_chart

SWEEP_REPORT_NAME = "sweep.html"


def seed_curves(summary: dict) -> tuple[dict[str, list], dict[str, list]]:
    """Per seed: its held-out curve (summary["value"]: accuracy or reward) and its training reward per step."""
    held_out, reward = {}, {}
    for r in summary["runs"]:
        folder = Path(r["run_dir"])
        metrics = read_jsonl(folder / "metrics.jsonl")
        name = f"seed {r['seed']}"
        held_out[name] = held_out_curve(metrics, read_evals(folder), summary["value"])
        reward[name] = [(m.get("step", i + 1), m.get("reward/mean")) for i, m in enumerate(metrics)]
    return held_out, reward


def _table(summary: dict) -> str:
    pct = summary["value"] == "accuracy"
    cell = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: fmt(round(v, 4)))  # noqa: E731
    gain = lambda g: f'<td class="{"pos" if g > 0 else "neg" if g < 0 else ""}">{"+" if g >= 0 else ""}{cell(g)}</td>'  # noqa: E731
    rows = []
    for r in summary["runs"]:
        link = Path(r["run_dir"]).name + "/" + REPORT_NAME
        rows.append(f'<tr><th><a href="{e(link)}">seed {e(r["seed"])}</a></th><td>{cell(r["before"])}</td>'
                    f'<td>{cell(r["after"])}</td>{gain(r["gain"])}<td>{r["train_seconds"] / 60:.1f} min</td></tr>')
    for stat in ("mean", "std", "min", "max"):
        b, a, g, t = (summary[k][stat] for k in ("before", "after", "gain", "train_seconds"))
        g_cell = f"<td>{cell(g)}</td>" if stat == "std" else gain(g)
        rows.append(f"<tr><th>{stat}</th><td>{cell(b)}</td><td>{cell(a)}</td>{g_cell}<td>{t / 60:.1f} min</td></tr>")
    return ('<table class="num"><thead><tr><th></th><th>before</th><th>after</th><th>gain</th><th>training time</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def build_sweep_report(out_dir: Path, summary: dict) -> str:
    what = summary["value"] + (f" ({summary['metric']})" if summary.get("metric") else "")
    held_out, reward = seed_curves(summary)
    charts = [
        _chart_card(line_chart(held_out, f"Held-out {summary['value']}, every seed", width=560, height=260),
                    "Greedy evaluations of the same held-out problems: step 0 is before training, the last step after "
                    "it, and between them every eval.every steps (when set)."),
        _chart_card(line_chart(reward, "Training reward (reward/mean), every seed", width=560, height=260),
                    "Mean reward of each step's sampled completions."),
    ]
    body = [
        f"<header><h1>GRPO sweep <code>{e(out_dir.name)}</code></h1>",
        f'<p class="muted">{e(str(out_dir.resolve()))}: one run per seed (trainer.seed), everything else the same. '
        f"Held-out {e(what)} on {e(summary['num_problems'])} problems; std is the sample standard deviation over "
        "seeds.</p></header>",
        '<section id="table"><h2>Before and after training</h2>', _table(summary), "</section>",
        '<section id="curves"><h2>Curves</h2><div class="charts">', *charts, "</div></section>",
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>GRPO sweep: {e(out_dir.name)}</title>'
            f'<style>{CSS}</style></head><body>{"".join(body)}</body></html>\n')


def write_sweep_report(out_dir: Path, summary: dict) -> Path:
    path = Path(out_dir) / SWEEP_REPORT_NAME
    write_text_atomic(path, build_sweep_report(Path(out_dir), summary))
    return path
