"""Hierarchy-aware measures (evaluation.hierarchy_measures) against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sjea_tools.evaluation import (average_distance_at_k, h_ap, hierarchical_distance, hierarchy_measures,
                                   mistake_severity)

# Four fine classes in two coarse groups: {0, 1} -> group 0, {2, 3} -> group 1.
FINE_TO_COARSE = np.array([0, 0, 1, 1])
# Bank rows 0..7, two per class, so four per group.
BANK = np.array([0, 0, 1, 1, 2, 2, 3, 3])
QUERIES = np.array([0, 1, 2, 3])
IDS = np.array([[0, 2, 4, 1],      # classes 0 1 2 0 for a class-0 query -> distances 0 1 2 0
                [4, 0, 2, 6],      # classes 2 0 1 3 for a class-1 query -> distances 2 1 0 2
                [5, 4, 6, 7],      # classes 2 2 3 3 for a class-2 query -> distances 0 0 1 1 (the ideal list)
                [4, 6, -1, -1]])   # classes 2 3 - - for a class-3 query -> distances 1 0 2 2 (missing = 2)


def test_distances_in_the_two_level_tree():
    assert hierarchical_distance(IDS, BANK, QUERIES, FINE_TO_COARSE).tolist() == [
        [0, 1, 2, 0], [2, 1, 0, 2], [0, 0, 1, 1], [1, 0, 2, 2]]


def test_mistake_severity_counts_the_top1_mistakes_only():
    # top-1 distances 0, 2, 0, 1: two mistakes (queries 1 and 3) of severity 2 and 1 -> mean 1.5
    got = mistake_severity(IDS, BANK, QUERIES, FINE_TO_COARSE)
    assert got == {"top1_error": 50.0, "mistakes": 2, "mistake_severity": 1.5}
    perfect = mistake_severity(IDS[2:3], BANK, QUERIES[2:3], FINE_TO_COARSE)
    assert perfect == {"top1_error": 0.0, "mistakes": 0, "mistake_severity": None}


def test_average_distance_of_the_top_k():
    # k=1: (0+2+0+1)/4 = 0.75 (= severity 1.5 x error 0.5)
    # k=2: (0+1 + 2+1 + 0+0 + 1+0)/8 = 5/8 = 0.625
    # k=4: (3 + 5 + 2 + 5)/16 = 15/16 = 0.9375; k=5 is longer than the lists: None
    got = average_distance_at_k(IDS, BANK, QUERIES, FINE_TO_COARSE, ks=(1, 2, 4, 5))
    assert got == {"1": 0.75, "2": 0.625, "4": 0.9375, "5": None}


def test_h_ap_by_hand():
    # Relevance: same class 1, same group 0.5, else 0. The best top 4 of every query holds its 2
    # same-class rows and 2 same-group rows: normaliser 2*1 + 2*0.5 = 3.
    # H-rank(i) = rel(i) + sum_{j<i} min(rel(i), rel(j)); sum H-rank(i)/i over the relevant i:
    # q0 rel 1 .5 0 1:  1/1 + (.5+.5)/2 + (1+1+.5+0)/4 = 1 + .5 + .625 = 2.125 -> 2.125/3
    # q1 rel 0 .5 1 0:  (.5+0)/2 + (1+0+.5)/3 = .25 + .5 = .75 -> .75/3 = .25
    # q2 rel 1 1 .5 .5: 1/1 + 2/2 + 1.5/3 + 2/4 = 3 -> 3/3 = 1 (the ideal list)
    # q3 rel .5 1 0 0:  .5/1 + (1+.5)/2 = 1.25 -> 1.25/3
    # mean: (2.125/3 + .25 + 1 + 1.25/3) / 4 = (0.708333 + 0.25 + 1 + 0.416667) / 4 = 0.59375
    assert h_ap(IDS, BANK, QUERIES, FINE_TO_COARSE) == pytest.approx(59.375, abs=1e-9)
    # truncated to the top 2, the normaliser is the best top 2 (2 same-class rows = 2):
    # q0 (1 + 1/2)/2 = .75; q1 (.5/2)/2 = .125; q2 (1 + 1)/2 = 1; q3 (.5 + .75)/2 = .625 -> mean .625
    assert h_ap(IDS[:, :2], BANK, QUERIES, FINE_TO_COARSE) == pytest.approx(62.5, abs=1e-9)


def test_h_ap_is_plain_average_precision_without_coarse_groups():
    # every class its own group: relevance is binary, and H-AP is AP. rel 1 0 1 0 with both of the
    # class's rows retrieved: AP = (1/1 + 2/3)/2 = 0.8333
    ids = np.array([[0, 2, 1, 4]])
    assert h_ap(ids, BANK, np.array([0]), np.arange(4)) == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-9)


def test_h_ap_over_the_whole_bank_ranked_is_the_papers():
    # the whole bank ranked for a class-0 query: rel 1 0 .5 1 .5 0 0 0 (ids 0 4 2 1 3 5 6 7),
    # normaliser = all relevance in the bank = 1+1+.5+.5 = 3
    # 1/1 + (.5+0+.5)/3 + (1+0+.5+1)/4 + (.5+.5+0+.5+.5)/5 = 1 + 1/3 + .625 + .4 = 2.358333 -> /3
    ids = np.array([[0, 4, 2, 1, 3, 5, 6, 7]])
    assert h_ap(ids, BANK, np.array([0]), FINE_TO_COARSE) == pytest.approx(100 * 2.3583333333 / 3, abs=1e-6)


def test_a_query_without_relevant_rows_is_left_out():
    bank = np.array([2, 2, 3, 3])  # nothing of group 0 in this bank
    ids = np.array([[0, 1], [2, 0]])
    # query 0 (class 0) has no relevant row: left out; query 1 (class 2): rel .5 1 -> (.5/1 + 1.5/2)/2 = .625
    assert h_ap(ids, bank, np.array([0, 2]), FINE_TO_COARSE) == pytest.approx(62.5)
    assert h_ap(ids[:1], bank, np.array([0]), FINE_TO_COARSE) is None


def test_hierarchy_measures_bundle_the_same_numbers():
    got = hierarchy_measures(IDS, BANK, QUERIES, FINE_TO_COARSE)
    assert got["mistake_severity"] == 1.5 and got["top1_error"] == 50.0 and got["mistakes"] == 2
    assert got["avg_distance_at_k"] == {"1": 0.75, "5": None, "10": None, "20": None}
    assert got["h_ap"] == 59.375 and got["h_ap_depth"] == 4
