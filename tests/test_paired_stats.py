"""The winner-vs-baseline margin: a paired difference with a 95% interval, checked by hand."""

import math

import pytest

from search.study.paired_stats import margin, paired_difference


def values(xs, aggregation="mean", weight=1.0):
    return {"aggregation": aggregation, "weight": weight, "values": dict(enumerate(xs))}


def test_mean_metric_margin_equals_a_hand_computed_paired_interval():
    win = [1, 1, 0, 1, 1, 0, 1, 1]
    base = [0, 1, 0, 0, 1, 0, 1, 0]
    d = [a - b for a, b in zip(win, base)]  # 1 0 0 1 0 0 0 1
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    se = sd / math.sqrt(len(d))
    m = margin({"t": values(win)}, {"t": values(base)}, "maximize")
    assert m["difference"] == pytest.approx(mean)
    assert m["ci95"] == pytest.approx([mean - 1.959964 * se, mean + 1.959964 * se])
    assert m["examples"] == 8
    assert m["significant"] == (mean - 1.959964 * se > 0)


def test_minimized_metric_counts_a_lower_score_as_better():
    win, base = [0.1, 0.2, 0.3], [0.5, 0.4, 0.6]
    m = margin({"t": values(win)}, {"t": values(base)}, "minimize")
    assert m["difference"] == pytest.approx(0.3)  # winner 0.2 lower on average: better by 0.3
    assert m["ci95"][0] < 0.3 < m["ci95"][1]


def test_tasks_weigh_by_their_share_and_only_shared_examples_count():
    a = {"x": values([1, 1, 1, 0], weight=0.25), "y": values([0, 0, 1, 1], weight=0.75)}
    b = {"x": values([0, 0, 1, 0], weight=0.25), "y": {"aggregation": "mean", "weight": 0.75, "values": {0: 0, 1: 1}}}
    diff, se, n = paired_difference(a, b)
    # x: mean diff 0.5 on 4 examples; y: examples 0 and 1 only, diff (0 + -1)/2 = -0.5
    assert diff == pytest.approx(0.25 * 0.5 + 0.75 * -0.5)
    assert n == 6


def test_no_shared_examples_gives_no_margin():
    assert margin({"t": values([1, 0])}, {"u": values([1, 0])}, "maximize") is None
