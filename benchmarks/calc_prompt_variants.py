"""How often the untrained SmolLM2-135M-Instruct calls a calculator tool in a 2-turn episode, per prompt variant:
the measurements that chose configs/calculator.yaml's prompt (benchmarks/RESULTS_agents.md). A standalone sketch
of the episode (its own prompt pieces and parsing, model.generate through grpo's FastEngine), written before the
environment existed; `grpo probe configs/calculator.yaml` measures the chosen recipe with the real environment.

Usage: PYTHONPATH=src python benchmarks/calc_prompt_variants.py VARIANT [VARIANT ...] [--n 30] [--g 8] [--bare]
Prints one JSON line per variant (and samples); --out FILE also appends them there.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

torch.set_num_threads(1)

from grpo.data.arithmetic import arithmetic_rows  # noqa: E402
from grpo.models import load_model, load_tokenizer, resolve_model_folder  # noqa: E402
from grpo.rewards.builtin import extract_answer, to_number  # noqa: E402

INSTR = "Compute {question}. Reply with only the number."

# --- prompt pieces -------------------------------------------------------------------------------
TAG_TOOL = (
    "You have a calculator. To compute an expression, write <calculator>EXPRESSION</calculator> and stop; "
    "the result will be sent back to you. Then reply with only the final number."
)
TAG_EXAMPLE = " Example: to compute 12 * 34, write <calculator>12 * 34</calculator>"
TAG_TOOL_SHORT = "Use the calculator: write <calculator>EXPRESSION</calculator>."
JSON_TOOL = (
    'You have a tool named "calculator" that evaluates an arithmetic expression. To call it, write '
    '<tool_call>{"name": "calculator", "arguments": {"expression": EXPRESSION}}</tool_call> and stop; '
    "the result will be sent back to you. Then reply with only the final number."
)
JSON_EXAMPLE = (
    ' Example: to compute 12 * 34, write <tool_call>{"name": "calculator", "arguments": '
    '{"expression": "12 * 34"}}</tool_call>'
)

ENVS_DEFAULT = (  # CalculatorEnvironment(format="tags").reset(...)'s default system message, verbatim
    "You can use tools. To call one, write the call as shown below and stop; its result comes back in the next "
    "message. When you know the final answer, reply with it and without a tool call.\n\nTools:\n- calculator: "
    "Evaluate an arithmetic expression of numbers, + - * / ** and parentheses.\n  expression (string): the "
    "expression to evaluate, e.g. 123 * 456\n  Call: <calculator>123 * 456</calculator>"
)
TRANSCRIPT = (
    "\n\nExample:\nuser: Compute 12 * 34. Reply with only the number.\nassistant: <calculator>12 * 34</calculator>"
    "\ntool: 408\nassistant: 408"
)

TAG_RE = re.compile(r"<calculator>(.*?)</calculator>", re.S)
JSON_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tag(text):
    m = TAG_RE.search(text)
    return m.group(1).strip() if m else None


def parse_json(text):
    m = JSON_RE.search(text)
    if not m:
        return None
    try:
        obj = json.loads(m.group(1).strip())
        if obj.get("name") != "calculator":
            return None
        expr = obj.get("arguments", {}).get("expression")
        return str(expr) if expr is not None else None
    except Exception:
        return None


def V(fmt, where, example, role, temp, user_tmpl="Result: {r}", instr=INSTR, shots=0, system=None):
    return dict(fmt=fmt, where=where, example=example, role=role, temp=temp, user_tmpl=user_tmpl, instr=instr,
                shots=shots, system=system)


SHOTS = [("12 * 34", "408"), ("56 * 78", "4368")]


def call_text(fmt, expr):
    if fmt == "tag":
        return f"<calculator>{expr}</calculator>"
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>' % expr


VARIANTS = {
    # tag format
    "tag_sys_ex_tool_t1": V("tag", "system", True, "tool", 1.0),
    "tag_sys_noex_tool_t1": V("tag", "system", False, "tool", 1.0),
    "tag_user_ex_tool_t1": V("tag", "user", True, "tool", 1.0),
    "tag_user_noex_tool_t1": V("tag", "user", False, "tool", 1.0),
    "tag_sys_ex_user_t1": V("tag", "system", True, "user", 1.0),
    "tag_sys_ex_tool_t07": V("tag", "system", True, "tool", 0.7),
    "tag_user_ex_user_t1": V("tag", "user", True, "user", 1.0),
    "tag_user_ex_tool_t07": V("tag", "user", True, "tool", 0.7),
    # json format
    "json_sys_ex_tool_t1": V("json", "system", True, "tool", 1.0),
    "json_sys_noex_tool_t1": V("json", "system", False, "tool", 1.0),
    "json_user_ex_tool_t1": V("json", "user", True, "tool", 1.0),
    "json_sys_ex_user_t1": V("json", "system", True, "user", 1.0),
    "json_sys_ex_tool_t07": V("json", "system", True, "tool", 0.7),
    # worked examples as earlier chat turns (few-shot demonstrations: user, assistant call, result, answer)
    "tag_shot1_tool_t1": V("tag", "system", False, "tool", 1.0, shots=1),
    "tag_shot1_tool_t07": V("tag", "system", False, "tool", 0.7, shots=1),
    "tag_shot1_user_t1": V("tag", "system", False, "user", 1.0, shots=1),
    "tag_shot1_user_t07": V("tag", "system", False, "user", 0.7, shots=1),
    "tag_shot2_tool_t1": V("tag", "system", False, "tool", 1.0, shots=2),
    "tag_shot2_tool_t07": V("tag", "system", False, "tool", 0.7, shots=2),
    "tag_shot2_user_t07": V("tag", "system", False, "user", 0.7, shots=2),
    "json_shot1_tool_t1": V("json", "system", False, "tool", 1.0, shots=1),
    "json_shot1_tool_t07": V("json", "system", False, "tool", 0.7, shots=1),
    "json_shot2_tool_t07": V("json", "system", False, "tool", 0.7, shots=2),
    # the envs helper's default tags system message (describe_tools), and an in-text transcript example
    "envsdefault_tool_t1": V("tag", "system", False, "tool", 1.0, system=ENVS_DEFAULT),
    "envsdefault_tool_t07": V("tag", "system", False, "tool", 0.7, system=ENVS_DEFAULT),
    "envsdefault_shot1_tool_t1": V("tag", "system", False, "tool", 1.0, shots=1, system=ENVS_DEFAULT),
    "envsdefault_shot1_tool_t07": V("tag", "system", False, "tool", 0.7, shots=1, system=ENVS_DEFAULT),
    "envsdefault_shot2_tool_t07": V("tag", "system", False, "tool", 0.7, shots=2, system=ENVS_DEFAULT),
    "tag_transcript_tool_t1": V("tag", "system", False, "tool", 1.0, system=TAG_TOOL + TRANSCRIPT),
    "tag_transcript_tool_t07": V("tag", "system", False, "tool", 0.7, system=TAG_TOOL + TRANSCRIPT),
}


def build_messages(v, row):
    if v["fmt"] == "tag":
        tool = TAG_TOOL + (TAG_EXAMPLE if v["example"] else "")
    else:
        tool = JSON_TOOL + (JSON_EXAMPLE if v["example"] else "")
    if v.get("system"):
        tool = v["system"]
    q = v["instr"].format(question=row["question"])
    if v["shots"]:
        msgs = [{"role": "system", "content": tool}]
        for expr, val in SHOTS[: v["shots"]]:
            msgs += [{"role": "user", "content": v["instr"].format(question=expr)},
                     {"role": "assistant", "content": call_text(v["fmt"], expr)},
                     result_message(v, val), {"role": "assistant", "content": val}]
        return msgs + [{"role": "user", "content": q}]
    if v["where"] == "system":
        return [{"role": "system", "content": tool}, {"role": "user", "content": q}]
    return [{"role": "user", "content": tool + "\n\n" + q}]


def result_message(v, value):
    if v["role"] == "tool":
        return {"role": "tool", "content": value}
    return {"role": "user", "content": v["user_tmpl"].format(r=value)}


def evaluate(expr):
    if expr is None:
        return None
    val = to_number(expr)
    if val is None:
        return "Error: not an arithmetic expression"
    return str(int(val)) if float(val).is_integer() else str(val)


def continuation_ids(tok, messages, assistant_text, new_msgs):
    """Tokens the chat template adds after the sampled assistant text: '<|im_end|>\\n' + new msgs + gen prompt."""
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": assistant_text}] + new_msgs,
                                   add_generation_prompt=True, tokenize=False)
    before = tok.apply_chat_template(messages + [{"role": "assistant", "content": assistant_text}],
                                     tokenize=False)
    head = before[: before.rindex(assistant_text) + len(assistant_text)]
    assert full.startswith(head)
    return tok(full[len(head):], add_special_tokens=False).input_ids


ENGINE = None


def generate(model, tok, prompts, temp, max_new, stops, group=1, greedy=False, seed=0):
    """grpo's FastEngine: `group` samples of each prompt; returns the new ids per row (row = b*group+g)."""
    from grpo.rollout.base import SamplingParams
    from grpo.rollout.engine import FastEngine

    global ENGINE
    if ENGINE is None:
        ENGINE = FastEngine(model, tok)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0 if greedy else temp, stop=tuple(stops or ()))
    ro = ENGINE.generate(prompts, group, params, seeds=[seed * 100003 + i for i in range(len(prompts))])
    return [ids[m].tolist() for ids, m in zip(ro.completion_ids, ro.completion_mask)]


def run_variant(name, v, model, tok, rows, G, max_new, max_new2, chunk, show, seed):
    parse = parse_tag if v["fmt"] == "tag" else parse_json
    stops = ["</calculator>"] if v["fmt"] == "tag" else ["</tool_call>"]
    eps = []  # per sample
    t0 = time.time()
    for i in range(0, len(rows), chunk):
        batch = rows[i:i + chunk]
        msgs = [build_messages(v, r) for r in batch]
        prompts = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids for m in msgs]
        seqs = [p for p in prompts for _ in range(G)]
        t1 = generate(model, tok, prompts, v["temp"], max_new, stops, group=G, seed=seed + i)
        second, idx = [], []
        for j, ids in enumerate(t1):
            r, m = batch[j // G], msgs[j // G]
            text = tok.decode(ids, skip_special_tokens=True)
            expr = parse(text)
            e = dict(q=r["question"], ans=r["answer"], t1=text, expr=expr, t2=None)
            if expr is not None:
                val = evaluate(expr)
                e["result"] = val
                cont = continuation_ids(tok, m, text, [result_message(v, val)])
                second.append(seqs[j] + ids + cont)
                idx.append(len(eps))
            eps.append(e)
        if second:
            t2 = generate(model, tok, second, v["temp"], max_new2, None, seed=seed + 7919 + i)
            for k, ids in zip(idx, t2):
                eps[k]["t2"] = tok.decode(ids, skip_special_tokens=True)
    for e in eps:
        final = e["t2"] if e["expr"] is not None else e["t1"]
        a = to_number(extract_answer(final) or "")
        e["correct"] = float(a is not None and abs(a - float(e["ans"])) < 1e-6)
        e["right_expr"] = e["expr"] is not None and to_number(e["expr"]) == float(e["ans"])
        e["echo_result"] = e["expr"] is not None and e.get("result") is not None and \
            e["t2"] is not None and e["result"] in e["t2"]
    n = len(eps)
    groups = [eps[k:k + G] for k in range(0, n, G)]
    stats = dict(
        variant=name, **v, problems=len(groups), G=G, max_new=max_new, max_new2=max_new2,
        call=sum(e["expr"] is not None for e in eps) / n,
        right_expr=sum(e["right_expr"] for e in eps) / n,
        correct=sum(e["correct"] for e in eps) / n,
        correct_given_right_call=(sum(e["correct"] for e in eps if e["right_expr"]) /
                                  max(1, sum(e["right_expr"] for e in eps))),
        pass_at_G=sum(any(e["correct"] for e in g) for g in groups) / len(groups),
        all_equal=sum(len({e["correct"] for e in g}) == 1 for g in groups) / len(groups),
        seconds=round(time.time() - t0, 1),
    )
    for e in eps[:show]:
        print(json.dumps({k: e[k] for k in ("q", "t1", "t2", "correct")}))
    return stats, eps


def bare(model, tok, rows, max_new):
    msgs = [[{"role": "user", "content": INSTR.format(question=r["question"])}] for r in rows]
    seqs = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False).input_ids for m in msgs]
    out = generate(model, tok, seqs, 1.0, max_new, None, greedy=True)
    texts = [tok.decode(o, skip_special_tokens=True) for o in out]
    ok = []
    for t, r in zip(texts, rows):
        a = to_number(extract_answer(t) or "")
        ok.append(a is not None and abs(a - float(r["answer"])) < 1e-6)
    for t, r in list(zip(texts, rows))[:5]:
        print(r["question"], r["answer"], repr(t))
    return dict(variant="bare_greedy_no_tool", problems=len(rows), max_new=max_new, correct=sum(ok) / len(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--max-new2", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--show", type=int, default=6)
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--bare-max-new", type=int, default=32)
    ap.add_argument("--split", default="eval")
    ap.add_argument("--temp", type=float, default=None, help="override the variants' temperature (0: greedy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also append each variant's JSON line to this file")
    args = ap.parse_args()
    f = resolve_model_folder(None)
    tok = load_tokenizer(f)
    model = load_model(f).eval()
    train, ev = arithmetic_rows(3, ["*"], 200, 80, INSTR, seed=0)
    rows = (ev if args.split == "eval" else train)[: args.n]
    out = open(args.out, "a") if args.out else None
    if args.bare:
        s = bare(model, tok, ev[:80], args.bare_max_new)
        print(json.dumps(s))
        if out:
            out.write(json.dumps(s) + "\n")
    for name in args.variants:
        torch.manual_seed(args.seed)
        v = dict(VARIANTS[name])
        if args.temp is not None:
            v["temp"] = args.temp
            name = f"{name}@T{args.temp}"
        s, eps = run_variant(name, v, model, tok, rows, args.g, args.max_new, args.max_new2, args.chunk, args.show, args.seed * 1000)
        print(json.dumps(s))
        if out:
            out.write(json.dumps(s) + "\n")
            out.flush()


if __name__ == "__main__":
    sys.exit(main())
