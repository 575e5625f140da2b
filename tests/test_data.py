"""The LM loss's row sampling (`data.sample_lm_rows`): its scaled sum is an unbiased estimate of the sum over every
row, checked by enumerating every subset it can draw, and it draws each subset about equally often."""

import itertools
import math
from collections import Counter

import pytest
import torch

from rkd_trl.data import sample_lm_rows


def lm_batch(rows: int, length: int = 3):
    input_ids = torch.arange(rows * length).reshape(rows, length)  # row i holds 3i, 3i+1, 3i+2: the row is readable
    return input_ids, torch.ones_like(input_ids), input_ids.clone()


@pytest.mark.parametrize("rows, share", [(4, 0.5), (5, 0.4), (8, 0.25), (3, 0.9)])
def test_the_scaled_sum_of_the_drawn_rows_is_unbiased(rows, share):
    input_ids, attention_mask, labels = lm_batch(rows)
    row_losses = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.5, 7.0, 4.0, 6.0][:rows])  # any per-row token-loss sums
    _, _, _, scale = sample_lm_rows(input_ids, attention_mask, labels, share)
    drawn = math.ceil(share * rows)
    assert scale == rows / drawn
    # Every subset of `drawn` rows is equally likely under a uniform draw without replacement: the mean of the
    # estimate over all of them is its expectation.
    estimates = [scale * row_losses[list(subset)].sum() for subset in itertools.combinations(range(rows), drawn)]
    assert torch.stack(estimates).mean() == pytest.approx(row_losses.sum().item(), rel=1e-6)


def test_every_subset_is_drawn_about_equally_often_and_rows_stay_whole():
    input_ids, attention_mask, labels = lm_batch(4)
    counts = Counter()
    torch.manual_seed(0)
    for _ in range(1200):
        ids, mask, drawn_labels, scale = sample_lm_rows(input_ids, attention_mask, labels, 0.5)
        assert ids.shape == (2, 3) and scale == 2.0 and torch.equal(ids, drawn_labels) and mask.all()
        counts[tuple(sorted(int(row[0]) // 3 for row in ids))] += 1
    assert len(counts) == 6 and all(150 <= count <= 250 for count in counts.values()), counts  # 200 expected each


def test_share_one_keeps_every_row_and_a_tiny_share_draws_one():
    input_ids, attention_mask, labels = lm_batch(4)
    ids, mask, drawn_labels, scale = sample_lm_rows(input_ids, attention_mask, labels, 1.0)
    assert ids is input_ids and mask is attention_mask and drawn_labels is labels and scale == 1.0
    ids, _, _, scale = sample_lm_rows(input_ids, attention_mask, labels, 0.01)
    assert ids.size(0) == 1 and scale == 4.0
