"""What a language-model run reports: evaluation sums -> metrics, summaries, the table.

An evaluation adds up `lm_step.eval_sums` over the whole validation split, so every figure is
an exact token mean: perplexity exp(Σ NLL / N), token accuracy (top-1), KL(p_t ‖ p_s) per
token at τ = 1, and per bin of the teacher's entropy H_t ∈ [0, ln V] (8 equal bins) the
share of tokens, the student's NLL and the mean weight its method gives them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SUMMARY_FORMAT = "jaxkd-lm-summary-1"
SWEEP_FORMAT = "jaxkd-lm-sweep-1"


def add_sums(total: dict | None, sums: dict) -> dict:
  """Host float64 running sums of `eval_sums` outputs."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return sums if total is None else {k: total[k] + v for k, v in sums.items()}


def eval_metrics(sums: dict, vocab_size: int) -> dict[str, Any]:
  """{"val_ppl", "val_nll", "val_acc" (%), "val_tokens"} and with a teacher "val_kl" and
  "by_teacher_entropy" (a row per bin: its range in nats, token share, student NLL, mean
  weight)."""
  n = max(float(sums["tokens"]), 1.0)
  nll = float(sums["nll"]) / n
  out = {"val_ppl": math.exp(nll), "val_nll": nll, "val_acc": 100.0 * float(sums["hits"]) / n,
         "val_tokens": int(sums["tokens"])}
  if "kl" in sums:
    out["val_kl"] = float(sums["kl"]) / n
    bins, width = len(sums["bucket_tokens"]), math.log(vocab_size) / len(sums["bucket_tokens"])
    rows = []
    for b in range(bins):
      t = float(sums["bucket_tokens"][b])
      rows.append({"teacher_entropy": [round(b * width, 3), round((b + 1) * width, 3)],
                   "token_share": t / n,
                   "student_nll": float(sums["bucket_nll"][b]) / t if t else None,
                   "weight_mean": float(sums["bucket_weight"][b]) / t if t else None})
    out["by_teacher_entropy"] = rows
  return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The numbers of `eval_metrics` for metrics.jsonl (the bins flattened)."""
  out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
  for b, row in enumerate(metrics.get("by_teacher_entropy", ())):
    if row["weight_mean"] is not None:
      out[f"weight_mean_bin{b}"] = row["weight_mean"]
  return out


def record(history: dict[str, Any], metrics: dict[str, Any], step: int) -> None:
  """Keeps the last and the best (lowest perplexity) evaluation in `history`."""
  history["last"] = {"step": step, **metrics}
  if history.get("best") is None or metrics["val_ppl"] < history["best"]["val_ppl"]:
    history["best"] = {"step": step, **metrics}


def member_summary(history: dict[str, Any], **fields: Any) -> dict[str, Any]:
  last, best = history.get("last") or {}, history.get("best") or {}
  return {"format": SUMMARY_FORMAT, **fields, "val_ppl": last.get("val_ppl"),
          "val_acc": last.get("val_acc"), "val_kl": last.get("val_kl"),
          "best_val_ppl": best.get("val_ppl"), "best_step": best.get("step"),
          "last": last, "best": best}


def describe(summary: dict[str, Any]) -> str:
  """One line: the validation perplexity (and what it compares with)."""
  text = (f"{summary['model']} ({summary['method']}): validation perplexity "
          f"{summary['val_ppl']:.2f} (best {summary['best_val_ppl']:.2f} at step "
          f"{summary['best_step']}), token accuracy {summary['val_acc']:.2f}%")
  if summary.get("teacher"):
    text += f"; teacher {summary['teacher']['val_ppl']:.2f}"
  return text + f"; unigram baseline {summary['unigram_ppl']:.1f}"


def _f(value, digits=2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict[str, Any]], *, unigram_ppl: float,
                 teacher: dict[str, Any] | None, title: str) -> str:
  """Markdown: a row per run/member (validation perplexity last and best, token accuracy,
  KL from the teacher, the mean KD weight), then the teacher and the unigram baseline."""
  lines = [title, "", "| run | model | method | val ppl | best val ppl | token acc % | "
           "KL(t‖s) | mean weight | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['model']} | {r['method']} | {_f(r['val_ppl'])} | "
                 f"{_f(r['best_val_ppl'])} | {_f(r['val_acc'])} | {_f(r.get('val_kl'), 3)} | "
                 f"{_f(r.get('weight_mean'), 3)} | {_f(r.get('tokens_per_sec'), 0)} |")
  if teacher:
    lines.append(f"| teacher | {teacher['model']} | - | {_f(teacher['val_ppl'])} | - | "
                 f"{_f(teacher['val_acc'])} | - | - | - |")
  lines.append(f"| unigram | - | - | {_f(unigram_ppl, 1)} | - | - | - | - | - |")
  return "\n".join(lines)


def weight_mean(summary: dict[str, Any]) -> float | None:
  """The token-weighted mean weight of the last evaluation (None without a teacher)."""
  rows = (summary.get("last") or {}).get("by_teacher_entropy")
  if not rows:
    return None
  return sum(r["token_share"] * (r["weight_mean"] or 0.0) for r in rows)


def table_row(run: str, summary: dict[str, Any]) -> dict[str, Any]:
  return {"run": run, "model": summary["model"], "method": summary["method"],
          "val_ppl": summary["val_ppl"], "best_val_ppl": summary["best_val_ppl"],
          "val_acc": summary["val_acc"], "val_kl": summary.get("val_kl"),
          "weight_mean": None if summary["method"] == "ce" else weight_mean(summary),
          "tokens_per_sec": summary.get("tokens_per_sec")}
