"""jaxkd.diagnostics against hand-computed answers and independent float64 references
(plain loops over examples, brute force over the orderings of ties, scipy)."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from jaxkd import diagnostics as dg


# ------------------------------------------------------------------------------------------
# Independent references: one example, one bin, one ordering at a time.
# ------------------------------------------------------------------------------------------


def ref_softmax(z, t=1.0):
  out = []
  for row in np.asarray(z, np.float64):
    e = [math.exp(v / t - max(row) / t) for v in row]
    out.append([v / sum(e) for v in e])
  return np.asarray(out)


def ref_ece(conf, correct, m=15):
  edges = np.linspace(0, 1, m + 1)
  total = 0.0
  for b in range(m):
    idx = [i for i, c in enumerate(conf)
           if (edges[b] < c <= edges[b + 1]) or (b == 0 and c == 0)]
    if idx:
      acc = sum(correct[i] for i in idx) / len(idx)
      cf = sum(conf[i] for i in idx) / len(idx)
      total += len(idx) / len(conf) * abs(acc - cf)
  return total


def ref_aurc_one_order(correct_in_order):
  risks, errors = [], 0
  for k, ok in enumerate(correct_in_order, 1):
    errors += not ok
    risks.append(errors / k)
  return sum(risks) / len(risks)


def ref_aurc(conf, correct):
  """The mean over every ordering by non-increasing confidence (ties in any order)."""
  values = []
  for perm in itertools.permutations(range(len(conf))):
    if all(conf[perm[i]] >= conf[perm[i + 1]] for i in range(len(perm) - 1)):
      values.append(ref_aurc_one_order([correct[i] for i in perm]))
  return sum(values) / len(values)


# ------------------------------------------------------------------------------------------
# Hand-computable cases.
# ------------------------------------------------------------------------------------------


def test_ece_known_answer():
  # Two examples at 0.95 (one right) and two at 0.55 (both right):
  # 1/2·|0.5 − 0.95| + 1/2·|1 − 0.55| = 0.45.
  conf, correct = [0.95, 0.95, 0.55, 0.55], [True, False, True, True]
  assert dg.ece(conf, correct) == pytest.approx(0.45, abs=1e-12)
  bins = dg.reliability_bins(conf, correct)
  assert len(bins["count"]) == 15 and sum(bins["count"]) == 4
  assert bins["count"][14] == 2 and bins["count"][8] == 2  # (14/15, 1] and (8/15, 9/15]
  assert bins["accuracy"][14] == 0.5 and bins["confidence"][8] == pytest.approx(0.55)
  assert bins["accuracy"][0] is None
  assert bins["lower"][0] == 0.0 and bins["upper"][-1] == 1.0


def test_ece_bins_are_right_closed_at_every_edge():
  edges = np.linspace(0, 1, 16)
  b = dg.reliability_bins(edges, np.ones(16, bool))
  # 0 and e_1 fall in bin 0, e_b in bin b − 1 for b ≥ 1: even e_3 = 0.2 (0.2·15 > 3 in floats).
  assert b["count"] == [2] + [1] * 14


def test_perfectly_calibrated_and_overconfident():
  assert dg.ece([1.0, 1.0], [True, True]) == 0.0
  assert dg.ece([1.0, 1.0], [False, False]) == 1.0


def test_aurc_known_answer():
  # Ranked 0.9 ✓, 0.8 ✗, 0.7 ✓, 0.6 ✗: risks 0, 1/2, 1/3, 1/2.
  conf, correct = [0.6, 0.9, 0.7, 0.8], [False, True, True, False]
  cov, risk = dg.risk_coverage(conf, correct)
  np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])
  assert dg.aurc(conf, correct) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 4)
  # The ideal ranking's risks: 0, 0, 1/3, 1/2.
  assert dg.e_aurc(conf, correct) == pytest.approx(1 / 8)


def test_aurc_ties_are_the_mean_over_their_orders():
  # One tie of a right and a wrong answer: orders (✓✗) 0.25 and (✗✓) 0.75, mean 0.5.
  assert dg.aurc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
  assert dg.aurc([0.5, 0.5], [False, True]) == pytest.approx(0.5)
  assert dg.aurc([0.7, 0.7, 0.7], [True, True, True]) == 0.0


def test_class_mass_known_answer():
  z = np.array([[math.log(3.0), 0.0], [0.0, 0.0]])
  mass = dg.class_mass(z, (1.0, 2.0))
  s = math.sqrt(3.0)
  np.testing.assert_allclose(mass, [[0.75 + 0.5, 0.25 + 0.5],
                                    [s / (s + 1) + 0.5, 1 / (s + 1) + 0.5]])
  np.testing.assert_allclose(dg.class_mass(np.zeros((6, 3))), np.full((4, 3), 2.0))


def test_rank_groups_and_recall_gain_known_answer():
  mass = [10, 80, 30, 70, 20, 60, 50, 40]      # ranks: 1, 3, 5, 6, 7, 2, 4, 0
  groups = dg.rank_groups(mass, 4)
  assert [g.tolist() for g in groups] == [[1, 3], [5, 6], [7, 2], [4, 0]]
  base = [50, 50, 50, 50, 50, 50, 50, 50]
  run = [51, 60, 52, 56, 50, 53, 55, 54]
  # Groups: (60+56)/2 − 50 = 8, (53+55)/2 − 50 = 4, (54+52)/2 − 50 = 3, (50+51)/2 − 50 = 0.5.
  assert dg.recall_gain_by_group(run, base, mass) == pytest.approx([8, 4, 3, 0.5])
  assert dg.grouped_recall(run, mass) == pytest.approx([58, 54, 53, 50.5])
  # A class without test examples (None) is skipped; a group of only such classes is None.
  run[4] = run[0] = None
  assert dg.recall_gain_by_group(run, base, mass) == pytest.approx([8, 4, 3, None])
  # 10 classes in quarters: 3, 3, 2, 2.
  assert [len(g) for g in dg.rank_groups(np.arange(10), 4)] == [3, 3, 2, 2]


def test_rank_ties_go_to_the_lower_class():
  assert dg.mass_order([1.0, 2.0, 2.0, 0.5]).tolist() == [1, 2, 0, 3]


def test_per_class_recall_known_answer():
  r = dg.per_class_recall([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 4)
  np.testing.assert_allclose(r[:3], [100.0, 50.0, 50.0])
  assert np.isnan(r[3])


def test_weight_stats_known_answer():
  w = [1.0, 2.0, 3.0, 4.0]
  s = dg.weight_stats(w, [0, 0, 1, 1], 3, percentiles=(50,), bins=3)
  assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(1.25))
  assert s["min"] == 1.0 and s["max"] == 4.0 and s["percentiles"] == {"50": 2.5}
  assert s["histogram"] == {"edges": [1.0, 2.0, 3.0, 4.0], "counts": [1, 1, 2]}
  assert s["class_mean"] == [1.5, 3.5, None]


def test_records_of_diagnostics_json():
  r = dg.class_mass_record([[1.0, 3.0], [2.0, 2.0]], (1, 2), 4)
  assert r == {"split": "train", "augmentation": False, "num_examples": 4,
               "temperatures": [1.0, 2.0], "mass": [[1.0, 3.0], [2.0, 2.0]]}
  e = dg.epoch_weight_record(3, [1.0, 2.0, 3.0, 4.0], percentiles=(50,))
  assert e == {"epoch": 3, "mean": 2.5, "std": pytest.approx(math.sqrt(1.25)),
               "percentiles": {"50": 2.5}}
  with pytest.raises(ValueError, match=r"\[T, C\] with T = 3"):
    dg.class_mass_record([[1.0, 3.0]], (1, 2, 4), 4)


def test_nll_known_answer():
  z = [[math.log(3.0), 0.0], [0.0, 0.0]]
  assert dg.nll(z, [0, 1]) == pytest.approx((-math.log(0.75) + math.log(2.0)) / 2)


def test_calibration_bundle():
  z = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
  y = np.array([0, 1, 0, 1])
  out = dg.calibration(z, y)
  conf = ref_softmax(z).max(1)
  correct = ref_softmax(z).argmax(1) == y
  assert out["top1"] == 50.0 and out["num_examples"] == 4 and out["num_bins"] == 15
  assert out["ece"] == pytest.approx(ref_ece(conf, correct))
  assert out["aurc"] == pytest.approx(ref_aurc(conf, correct))
  assert out["nll"] == pytest.approx(dg.nll(z, y))


# ------------------------------------------------------------------------------------------
# Randomized comparisons with the references.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_against_references(seed):
  rng = np.random.default_rng(seed)
  n, c = 200, 7
  z = rng.normal(size=(n, c)) * rng.uniform(0.1, 5)
  y = rng.integers(0, c, n)
  np.testing.assert_allclose(dg.softmax(z, 3.0), ref_softmax(z, 3.0), rtol=1e-12)
  conf, correct = dg.confidence_and_correct(z, y)
  assert dg.ece(conf, correct) == pytest.approx(ref_ece(conf, correct), abs=1e-12)
  assert dg.aurc(conf, correct) == pytest.approx(
      ref_aurc_one_order(correct[np.argsort(-conf)]), abs=1e-12)  # no ties here
  p = ref_softmax(z)
  assert dg.nll(z, y) == pytest.approx(-np.mean(np.log(p[np.arange(n), y])), rel=1e-12)
  temps = (1.0, 2.0, 4.0, 8.0)
  np.testing.assert_allclose(dg.class_mass(z, temps),
                             [ref_softmax(z, t).sum(0) for t in temps], rtol=1e-12)
  recall = dg.per_class_recall(p.argmax(1), y, c)
  for k in range(c):
    assert recall[k] == pytest.approx(100 * np.mean(p.argmax(1)[y == k] == k))


@pytest.mark.parametrize("seed", range(6))
def test_random_ties_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  conf = rng.choice([0.3, 0.6, 0.9], size=6)
  correct = rng.random(6) < 0.5
  assert dg.aurc(conf, correct) == pytest.approx(ref_aurc(conf, correct), abs=1e-12)
  perm = rng.permutation(6)  # the input order does not matter
  assert dg.aurc(conf[perm], correct[perm]) == pytest.approx(dg.aurc(conf, correct))


@pytest.mark.parametrize("seed", range(3))
def test_random_grouped_gain_and_weights(seed):
  rng = np.random.default_rng(seed)
  c, g = 20, 4
  mass = rng.random(c)
  run, base = rng.uniform(0, 100, c), rng.uniform(0, 100, c)
  ranked = sorted(range(c), key=lambda k: -mass[k])
  expect = [np.mean([run[k] - base[k] for k in ranked[i * 5:(i + 1) * 5]]) for i in range(g)]
  np.testing.assert_allclose(dg.recall_gain_by_group(run, base, mass, g), expect)
  w = rng.gamma(2.0, size=300)
  y = rng.integers(0, c, 300)
  s = dg.weight_stats(w, y, c)
  assert s["mean"] == pytest.approx(np.mean(w)) and s["std"] == pytest.approx(np.std(w))
  assert s["percentiles"]["95"] == pytest.approx(np.percentile(w, 95))
  assert sum(s["histogram"]["counts"]) == 300
  np.testing.assert_allclose(s["class_mean"], [w[y == k].mean() for k in range(c)])
  ref = scipy.stats.spearmanr(s["class_mean"], mass).statistic
  assert dg.spearman(s["class_mean"], mass) == pytest.approx(ref)


def test_spearman_ties_and_missing_against_scipy():
  x = [1, 2, 2, 3, None, 5]
  y = [2, 1, 4, 4, 7, 9]
  assert dg.spearman(x, y) == pytest.approx(
      scipy.stats.spearmanr([1, 2, 2, 3, 5], [2, 1, 4, 4, 9]).statistic)
  assert dg.spearman([1, 1, 1], [1, 2, 3]) is None


# ------------------------------------------------------------------------------------------
# Bad input: one clear error.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: dg.ece([1.5], [True]), "probabilities in"),
    (lambda: dg.ece([0.5, 0.5], [True]), "one length"),
    (lambda: dg.nll(np.zeros(3), [0]), r"\[N, C\]"),
    (lambda: dg.nll([[0.0, np.nan]], [0]), "NaN"),
    (lambda: dg.nll([[0.0, 1.0]], [2]), r"labels must lie in \[0, 2\)"),
    (lambda: dg.softmax([[0.0, 1.0]], 0.0), "temperature"),
    (lambda: dg.rank_groups([1.0, 2.0], 3), "num_groups"),
    (lambda: dg.recall_gain_by_group([1.0], [1.0, 2.0], [1.0, 2.0]), "one value per class"),
    (lambda: dg.weight_stats([]), "non-empty"),
    (lambda: dg.weight_stats([1.0], [0]), "num_classes"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()
