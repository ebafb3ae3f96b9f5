"""The size target's predicates (core.goals.Goals) on numbers checked by hand."""

from __future__ import annotations

import pytest

from core.options import Target
from core.run.goals import RESOLVING_SAMPLES, Goals, Size, Verdict, budget_resolution, reductions

ORIGINAL = Size(macs=1000, params=200)
# 1000 held-out samples resolve a one-point budget (10 samples); 100 do not (one sample is a point)
RESOLVED = budget_resolution(0.01, 1000, 0.2)
HALF_THE_MACS = Goals(Target(macs_reduction=0.5, max_accuracy_drop=0.01), ORIGINAL, accuracy=0.9,
                      soft_agreement=0.8, resolution=RESOLVED)
HALF_OF_BOTH = Goals(Target(macs_reduction=0.5, params_reduction=0.5), ORIGINAL, accuracy=0.9,
                     soft_agreement=0.8, resolution=RESOLVED)


def test_reductions_are_fractions_of_the_original_removed():
    assert reductions(Size(600, 150), ORIGINAL) == pytest.approx({"macs": 0.4, "params": 0.25})
    assert HALF_THE_MACS.reductions(ORIGINAL) == {"macs": 0.0, "params": 0.0}


def test_only_the_measures_the_target_names_count():
    assert HALF_THE_MACS.fractions == {"macs": 0.5}
    assert HALF_OF_BOTH.fractions == {"macs": 0.5, "params": 0.5}


def test_reached_needs_every_named_reduction_or_its_share():
    assert HALF_THE_MACS.reached(Size(500, 200)) and not HALF_THE_MACS.reached(Size(501, 200))
    assert HALF_THE_MACS.reached(Size(650, 200), share=0.7)  # 0.35 of 0.5
    assert not HALF_THE_MACS.reached(Size(660, 200), share=0.7)
    assert not HALF_OF_BOTH.reached(Size(500, 101)) and HALF_OF_BOTH.reached(Size(400, 100))


def test_met_allows_the_tolerance_below_the_target():
    assert HALF_THE_MACS.met(Size(520, 200))  # 0.48: within 0.03
    assert not HALF_THE_MACS.met(Size(540, 200))  # 0.46
    assert not HALF_OF_BOTH.met(Size(500, 120))  # params only 0.4


def test_overshoots_past_the_tolerance_above_the_target():
    assert HALF_THE_MACS.overshoots(Size(460, 200))  # 0.54
    assert not HALF_THE_MACS.overshoots(Size(480, 200))  # 0.52
    assert HALF_OF_BOTH.overshoots(Size(500, 80))  # params 0.6: one measure is enough


def test_progress_is_the_least_advanced_measure_capped_at_one():
    assert HALF_THE_MACS.progress(Size(750, 200)) == pytest.approx(0.5)
    assert HALF_THE_MACS.progress(Size(400, 200)) == 1.0
    assert HALF_OF_BOTH.progress(Size(750, 100)) == pytest.approx(0.5)


def test_no_larger_compares_only_the_named_measures():
    assert HALF_THE_MACS.no_larger(Size(500, 300), than=Size(600, 100))
    assert not HALF_OF_BOTH.no_larger(Size(500, 300), than=Size(600, 100))
    assert HALF_OF_BOTH.no_larger(Size(600, 100), than=Size(600, 100))
    assert not HALF_THE_MACS.no_larger(Size(601, 100), than=Size(600, 100))


def test_share_of_target_adds_up_the_named_measures():
    assert HALF_THE_MACS.share_of_target(ORIGINAL, Size(750, 200)) == pytest.approx(0.5)
    assert HALF_THE_MACS.share_of_target(Size(750, 200), Size(500, 50)) == pytest.approx(0.5)
    assert HALF_OF_BOTH.share_of_target(ORIGINAL, Size(750, 150)) == pytest.approx(1.0)


def test_accuracy_budget_is_the_drop_from_the_original():
    # a resolved budget is top-1 alone: soft agreement does not count
    assert HALF_THE_MACS.within_budget(Verdict(0.89, 0.1)) and HALF_THE_MACS.within_budget(Verdict(0.95, 0.8))
    assert not HALF_THE_MACS.within_budget(Verdict(0.88, 0.8))


def test_budget_resolution_counts_the_held_out_samples_that_decide_it():
    assert RESOLVED.resolved and RESOLVED.decided_by == "top1" and RESOLVED.warning is None
    assert RESOLVED.sample_worth == pytest.approx(0.001) and RESOLVED.top1_tolerance == 0.01
    small = budget_resolution(0.01, 64, 0.2)
    assert not small.resolved and small.decided_by == "top1_and_soft_agreement"
    assert small.top1_tolerance == pytest.approx(RESOLVING_SAMPLES / 64)
    # the warning says how many samples decide, what one is worth, and how much data would resolve it
    assert "64 held-out samples" in small.warning and "1.56%" in small.warning and "1500 samples" in small.warning
    assert budget_resolution(0.01, 300, 0.2).resolved  # exactly three samples
    assert not budget_resolution(0.01, 299, 0.2).resolved
    assert budget_resolution(0.0, 10, 0.2).resolved  # no drop at all: any split measures that


def test_an_unresolved_budget_is_judged_by_soft_agreement_and_top1_at_the_resolution():
    goals = Goals(Target(macs_reduction=0.5, max_accuracy_drop=0.01), ORIGINAL, accuracy=0.9, soft_agreement=0.8,
                  resolution=budget_resolution(0.01, 100, 0.2))
    # two flipped samples of 100 (2 points) with soft agreement kept: inside, where top-1 alone would refuse
    assert goals.within_budget(Verdict(0.88, 0.795))
    # soft agreement down by more than the budget: outside, though top-1 did not move
    assert not goals.within_budget(Verdict(0.9, 0.785))
    # four samples: past the resolution's three, whatever soft agreement says
    assert not goals.within_budget(Verdict(0.86, 0.8))
    assert goals.better(Verdict(0.85, 0.81), than=Verdict(0.9, 0.8))
    assert HALF_THE_MACS.better(Verdict(0.9, 0.5), than=Verdict(0.85, 0.8))
