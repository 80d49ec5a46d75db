"""A sweep's comparison: each member over its seeds, and paired against the baselines.

Within a seed every member of a sweep reads the same batches in the same order and starts
from the same student initialisation (common random numbers), so the difference between
two members is taken seed by seed, d_s = top1(member, s) − top1(baseline, s), and reported
as its mean ± the 95% Student-t half-width t_{0.975, n−1} · sd(d) / √n over the n seeds on
which neither diverged. The seed-to-seed variation that both members share cancels in d_s,
which is why the paired interval is much narrower than the two members' own ± std.

The baselines are the sweep's plain-KD member (method "kd") and its vanilla student
(method "ce"), the references of the papers' tables, when the sweep has them.
"""

from __future__ import annotations

import math
from typing import Any

from jaxkd import report_runs

__all__ = ["SUMMARY_FORMAT", "T_975", "t_975", "paired_difference", "over_seeds",
           "sweep_summary", "format_table"]

SUMMARY_FORMAT = report_runs.SWEEP_FORMAT

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (standard tables).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_975(df: int) -> float:
  """t_{0.975, df}; beyond the table the normal quantile 1.96 (within 2% from df 31 on)."""
  if df < 1:
    raise ValueError(f"a t interval needs df ≥ 1, got {df}.")
  return T_975[df - 1] if df <= len(T_975) else 1.959964


def _mean_sd(values: list[float]) -> tuple[float, float]:
  m = sum(values) / len(values)
  sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  return m, sd


def over_seeds(values: list[float | None]) -> dict[str, float] | None:
  """{"mean", "std" (ddof 1; 0 for one seed), "n"} of the values that are not None."""
  v = [float(x) for x in values if x is not None]
  if not v:
    return None
  m, sd = _mean_sd(v)
  return {"mean": m, "std": sd, "n": len(v)}


def paired_difference(a: list[float | None], b: list[float | None]) -> dict[str, Any] | None:
  """Seed-paired a − b: {"mean", "half_width" (95% t; None for one pair), "n"}; seeds where
  either is None (diverged) are left out."""
  d = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
  if not d:
    return None
  m, sd = _mean_sd(d)
  half = t_975(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else None
  return {"mean": m, "half_width": half, "n": len(d)}


def _top1(seed: dict[str, Any], kind: str) -> float | None:
  return None if seed.get("diverged_at_step") is not None else seed.get(kind)


def sweep_summary(members: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
  """The sweep's summary.json from its members' summaries.

  Args:
    members: per member {"name", "method", "seeds": [{"seed", "best_top1", "last_top1",
      "best_epoch", "diverged_at_step" (None unless it diverged)}, ...]}.
    fields: added as they are (teacher, model, images/s, steps, ...).

  Returns:
    {"format", "members": [member + "best_top1"/"last_top1" over its finite seeds],
     "paired": {baseline name: {member name: {"best_top1", "last_top1"}: paired_difference}},
     **fields}.
  """
  out_members = []
  for m in members:
    entry = dict(m)
    for kind in ("best_top1", "last_top1"):
      entry[kind] = over_seeds([_top1(s, kind) for s in m["seeds"]])
    entry["diverged"] = [s["seed"] for s in m["seeds"] if s.get("diverged_at_step") is not None]
    out_members.append(entry)
  paired = {}
  for method in ("kd", "ce"):
    base = next((m for m in members if m["method"] == method), None)
    if base is None:
      continue
    paired[base["name"]] = {
        m["name"]: {kind: paired_difference([_top1(s, kind) for s in m["seeds"]],
                                            [_top1(s, kind) for s in base["seeds"]])
                    for kind in ("best_top1", "last_top1")}
        for m in members if m is not base}
  return {"format": SUMMARY_FORMAT, "members": out_members, "paired": paired, **fields}


def _pm(ms: dict[str, float] | None) -> str:
  if ms is None:
    return "-"
  return f"{ms['mean']:.2f}" if ms["n"] == 1 else f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def _diff(d: dict[str, Any] | None) -> str:
  if d is None:
    return "-"
  half = "" if d["half_width"] is None else f" ± {d['half_width']:.2f}"
  return f"{d['mean']:+.2f}{half}"


def format_table(summary: dict[str, Any]) -> str:
  """The Markdown table of a sweep summary: per member best and last top-1 (mean ± std over
  seeds), and the paired difference of best top-1 to each baseline (mean ± 95% interval)."""
  bases = list(summary["paired"])
  seeds = max((len(m["seeds"]) for m in summary["members"]), default=0)
  head = ["member", "method", "best top-1", "last top-1"] + [f"Δ best vs {b}" for b in bases]
  lines = [f"Test top-1 over {seeds} seed{'s' if seeds != 1 else ''} (mean ± std); Δ: paired "
           f"by seed, mean ± 95% t interval", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for m in summary["members"]:
    row = [m["name"], m["method"], _pm(m["best_top1"]), _pm(m["last_top1"])]
    for b in bases:
      row.append("-" if m["name"] == b else _diff(summary["paired"][b][m["name"]]["best_top1"]))
    if m["diverged"]:
      row[0] += f" (diverged: seed {', '.join(map(str, m['diverged']))})"
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)
