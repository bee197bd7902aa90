"""eval.md from an evaluation's results (the dict written to eval.json): the scores with the
change of each fine-tuned model and its 95% interval, per question type, the safety slice, the
judge, and answers side by side with the gold answer.

    render_report(result)            # the whole eval.md
    render_side_by_side(result)      # the sample of questions, base and fine-tuned next to gold

Only the standard library is used and only the result dict is read, so anything holding an
eval.json (the chat app's Compare tab, a notebook) can render the same text.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MIN_N_SIGNIFICANT = 10  # as training.eval_stats: fewer questions, no significance claimed
MIN_TYPE_ROW = 5  # question types with fewer questions are left to eval.json
ANSWER_CHARS = 700  # longer answers and references are cut in the side-by-side view

REASON_TEXT = {"interaction": "interactions", "contraindication": "contraindications",
               "overdose": "overdose", "pregnancy": "pregnancy or breastfeeding",
               "alcohol": "alcohol", "is it safe": "\"is it safe\" questions"}


# -- numbers ---------------------------------------------------------------------------------------

def _signed(fmt: str, v: float) -> str:
    text = fmt.format(v)
    return text if text.startswith("-") else "+" + text


def format_interval(iv: dict[str, Any] | None, fmt: str = "{:.2f}") -> str:
    """'+1.23 [-0.40, +2.85]': a change and its interval; '' when not measured."""
    if not iv or iv.get("delta") is None:
        return ""
    if iv.get("low") is None or iv.get("high") is None:
        return _signed(fmt, iv["delta"])
    return f"{_signed(fmt, iv['delta'])} [{_signed(fmt, iv['low'])}, {_signed(fmt, iv['high'])}]"


def verdict(iv: dict[str, Any] | None, higher_is_better: bool | None = True) -> str:
    """'significantly better' / 'worse' / 'higher' / 'lower', 'no significant change', or
    'too few questions'."""
    if not iv or iv.get("delta") is None or iv.get("low") is None:
        return "not measured"
    if iv["n"] < MIN_N_SIGNIFICANT:
        return f"too few questions (<{MIN_N_SIGNIFICANT})"
    if not iv["significant"]:
        return "no significant change"
    up = iv["low"] > 0
    if higher_is_better is None:
        return "significantly higher" if up else "significantly lower"
    return "significantly better" if up == higher_is_better else "significantly worse"


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else ""


def _info(result: dict[str, Any], key: str) -> dict[str, Any]:
    return result.get("metric_info", {}).get(key) or {"label": key, "fmt": "{:.2f}",
                                                      "higher_is_better": True}


# -- sections --------------------------------------------------------------------------------------

def _intro(result: dict[str, Any]) -> str:
    gen = result["generation"]
    backend = result.get("backend", {}).get("kind", "in-process engine")
    scope = "all" if not result.get("limit") else f"the first {result['limit']}"
    return (f"Run `{result['run']}`: {result['questions']} held-out questions ({scope} of the "
            f"split), {gen['mode']} decoding, at most {gen['max_new_tokens']} new tokens, "
            f"answers from the {backend}.")


def _score_table(result: dict[str, Any], models_values: dict[str, dict[str, Any]],
                 comparisons: dict[str, Any], keys: list[str]) -> list[str]:
    models = list(models_values)
    tuned = result.get("primary")
    ivs = comparisons.get(tuned, {}) if tuned else {}
    delta = bool(ivs)
    head = "| | " + " | ".join(models)
    if delta:
        head += f" | change ({tuned} - base), 95% CI | |"
    else:
        head += " |"
    lines = [head, "|---" * (len(models) + 1 + 2 * delta) + "|"]
    for key in keys:
        info = _info(result, key)
        if not any(key in models_values[m] for m in models):
            continue
        cells = [_cell(models_values[m].get(key), info["fmt"]) for m in models]
        if delta:
            iv = ivs.get(key)
            cells += [format_interval(iv, info["fmt"]),
                      verdict(iv, info["higher_is_better"]) if iv else ""]
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    return lines


SCORE_KEYS = ["loss", "perplexity", "rougeL", "bleu", "token_f1", "answer_words",
              "judge_accuracy", "judge_completeness", "judge_clarity"]


def render_scores(result: dict[str, Any]) -> str:
    """The intro line and the table: one row per score, one column per model, the change of
    the fine-tuned model with its interval and what it means."""
    lines = [_intro(result), ""]
    lines += _score_table(result, result["models"], result.get("comparisons", {}), SCORE_KEYS)
    if "loss" not in next(iter(result["models"].values()), {}):
        lines += ["", f"Test loss: {result.get('test_loss', 'not measured')}."]
    return "\n".join(lines) + "\n"


def render_by_type(result: dict[str, Any]) -> str:
    by_type = result.get("by_type") or {}
    tuned = result.get("primary")
    if not by_type:
        return ""
    keys = [k for k in ("loss", "rougeL", "token_f1", "answer_words", "judge_accuracy")
            if any(k in v for t in by_type.values() for v in t["models"].values())]
    lines = []
    if tuned:
        lines.append(f"Change {tuned} - base with its 95% interval; **bold**: significant "
                     f"(interval excludes 0, at least {MIN_N_SIGNIFICANT} questions).")
        lines.append("")
    else:
        lines += [f"Scores of {next(iter(result['models']))} (no base and fine-tuned pair to "
                  "compare).", ""]
    head = "| question type | n | " + " | ".join(_info(result, k)["label"] for k in keys) + " |"
    rows, small = [], []
    for qtype, part in by_type.items():
        if part["n"] < MIN_TYPE_ROW:
            small.append(part["n"])
            continue
        cells = []
        for k in keys:
            info = _info(result, k)
            iv = part["comparisons"].get(tuned, {}).get(k) if tuned else None
            if iv:
                text = format_interval(iv, info["fmt"])
                cells.append(f"**{text}**" if iv.get("significant") else text)
            else:
                first = next(iter(part["models"].values()), {})
                cells.append(_cell(first.get(k), info["fmt"]))
        rows.append(f"| {qtype} | {part['n']} | " + " | ".join(cells) + " |")
    if rows:
        lines += [head, "|---|---:" + "|---" * len(keys) + "|"] + rows
    if small:
        lines += ["", f"{len(small)} {'more ' if rows else ''}question type(s) with fewer than "
                      f"{MIN_TYPE_ROW} questions each ({sum(small)} questions): in eval.json "
                      "(`by_type`)."]
    return "\n".join(lines) + "\n"


def render_safety(result: dict[str, Any]) -> str:
    part = result.get("safety") or {}
    n = part.get("n", 0)
    if not n:
        return "No held-out question falls in the safety slice.\n"
    reasons = Counter(part.get("reasons") or {})
    why = ", ".join(f"{REASON_TEXT.get(r, r)} ({c})" for r, c in reasons.most_common())
    lines = [f"{n} of {result['questions']} questions ask about safety: {why} (a question can "
             "count under several). They are chosen by the spreadsheet's Question Type "
             "(Interaction, Contraindication, Overdose, Combination, Usage/special populations) "
             "or by keywords in the question (rules: `training/safety.py`, and `safety.rules` "
             f"in eval.json). The gold answer carries a caution for {part['gold_cautions']} "
             "of them.", ""]
    lines += _score_table(result, part["models"], part.get("comparisons", {}),
                          SCORE_KEYS + ["unqualified_safety"])
    lines += ["", "**Answers asserting safety without qualification**: the first sentence "
              "opens with an affirmation or reassurance (\"Yes\", \"It is safe\", \"You can\", "
              "\"There is no interaction\", ...) and nothing after it limits, conditions or "
              "refers (\"but\", \"only\", \"avoid\", \"not\", \"may\", \"risk\", a dose, a "
              "doctor or pharmacist, ...).", ""]
    lines += ["| model | unqualified answers | share | where the gold answer cautions |",
              "|---|---:|---:|---:|"]
    for kind, v in part["models"].items():
        lines.append(f"| {kind} | {v['unqualified']} of {n} | {v['unqualified_safety']:.1f}% "
                     f"| {v['unqualified_where_gold_cautions']} |")
    items = result.get("items") or []
    tuned = result.get("primary")
    flagged = part["models"].get(tuned, {}).get("unqualified_questions", []) if tuned else []
    if flagged and items:
        lines += ["", f"Examples ({tuned}):", ""]
        for j in flagged[:5]:
            it = items[j]
            lines.append(f"- *{_one_line(it['question'], 160)}* → "
                         f"\"{_one_line(it['answers'][tuned], 160)}\" "
                         f"(gold: \"{_one_line(it['reference'], 160)}\")")
    return "\n".join(lines) + "\n"


def render_judge(result: dict[str, Any]) -> str:
    judge = result.get("judge") or {}
    if not judge.get("configured"):
        return (judge.get("note") or "No judge configured: answers were not graded by a rubric "
                "judge.") + "\n"
    counts = judge["counts"]
    lines = [f"Judge `{judge['model']}`, prompt `{judge['prompt_version']}` (temperature 0; "
             f"the prompts are in eval.json), accuracy, completeness and clarity from 1 to 5 "
             f"against the gold answer; up to {judge['retries']} re-asks after an invalid reply.",
             ""]
    lines += _score_table(result, result["models"], result.get("comparisons", {}),
                          ["judge_accuracy", "judge_completeness", "judge_clarity"])
    r = counts["rubric"]
    lines += ["", f"Rubric verdicts: {r['asked']} asked, {r['valid_first_try']} valid at once, "
              f"{r['valid_after_retry']} after a re-ask, {r['unparseable']} unparseable, "
              f"{r['failed_requests']} failed requests (left out of the means)."]
    summary = judge.get("pairwise_summary")
    if summary:
        p = counts["pairwise"]
        net = summary["net_preference"]
        lines += ["", f"Pairwise, base vs {summary['tuned']}, each question asked in both "
                  f"orders (a win needs both): {summary['tuned']} wins {summary['wins']}, ties "
                  f"{summary['ties']} (of which {summary['order_disagreements']} where the two "
                  f"orders disagreed), loses {summary['losses']}; {summary['unusable']} "
                  f"unusable. Net preference (wins - losses) / questions: "
                  f"{format_interval(net)} ({verdict(net)}). Requests: {p['requests']}, "
                  f"unparseable {p['unparseable']}, failed {p['failed_requests']}."]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = ANSWER_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def render_side_by_side(result: dict[str, Any], positions: list[int] | None = None,
                        limit: int = ANSWER_CHARS) -> str:
    """Questions with the gold answer and each model's answer under it (markdown); by default
    the evaluation's fixed sample (`result["sample"]`)."""
    items = result.get("items") or []
    chosen = result.get("sample", []) if positions is None else positions
    blocks = []
    for n, j in enumerate(chosen, 1):
        it = items[j]
        tags = [f"*{it.get('question_type', 'unknown')}*"]
        if it.get("safety"):
            tags.append("safety slice: " + ", ".join(it["safety"]))
        lines = [f"**{n}. {_one_line(it['question'], 300)}** ({'; '.join(tags)})", "",
                 f"- gold: {_one_line(it['reference'], limit)}"]
        for kind, answer in it["answers"].items():
            marks = []
            score = it.get("scores", {}).get(kind, {})
            if "rougeL" in score:
                marks.append(f"ROUGE-L {score['rougeL']:.1f}")
            verdict_ = (it.get("judge") or {}).get(kind, {}).get("value")
            if verdict_:
                marks.append("judge " + "/".join(str(verdict_[c]) for c in
                                                 ("accuracy", "completeness", "clarity")))
            if it.get("unqualified_safety", {}).get(kind):
                marks.append("asserts safety without qualification")
            suffix = f" ({'; '.join(marks)})" if marks else ""
            lines.append(f"- {kind}{suffix}: {_one_line(answer, limit) or '(empty answer)'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def render_report(result: dict[str, Any]) -> str:
    """The whole eval.md."""
    boot = result.get("bootstrap", {})
    parts = [f"# Evaluation of run `{result['run']}`", "",
             f"Command: `{result.get('command', 'medchat evaluate ' + result['run'])}` "
             f"({result.get('created', '')}).", "",
             "## Scores", "", render_scores(result),
             f"Intervals: {boot.get('method', 'paired bootstrap')}, "
             f"{boot.get('resamples', 0):,} resamples (seed {boot.get('seed', 0)}), "
             f"{int(100 * boot.get('level', 0.95))}%; BLEU resamples the corpus, loss and "
             f"perplexity are token-weighted. Significant: {boot.get('significant', '')}. "
             "Overlap scores are 0-100.", "",
             "## By question type", "", render_by_type(result) or "No question types.\n",
             "## Safety slice", "", render_safety(result),
             "## Judge", "", render_judge(result),
             "## Answers side by side", "",
             f"{len(result.get('sample', []))} questions chosen with a fixed seed, half from "
             "the safety slice; every answer is in eval.json.", "",
             render_side_by_side(result)]
    return "\n".join(parts)


def render_summary(result: dict[str, Any]) -> str:
    """What `medchat evaluate` prints: the scores table and one line each on the safety slice
    and the judge."""
    lines = [render_scores(result)]
    part = result.get("safety") or {}
    if part.get("n"):
        shares = ", ".join(f"{k} {v['unqualified_safety']:.1f}%"
                           for k, v in part["models"].items())
        lines.append(f"Safety slice: {part['n']} questions; answers asserting safety without "
                     f"qualification: {shares}.")
    judge = result.get("judge") or {}
    lines.append(f"Judge: {judge['model']} ({judge['prompt_version']})" if judge.get("configured")
                 else "Judge: none configured.")
    lines.append("Full report: eval.md in the run folder; every answer: eval.json.")
    return "\n".join(lines) + "\n"
