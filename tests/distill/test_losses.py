"""mimicdet.distill losses: hand-made values, normalisers, the properties each paper relies on."""

import pytest
import torch
import torch.nn.functional as F

from mimicdet.distill import defeat_losses, fgfi_loss, pfi_loss, rank_mimic_loss


def test_fgfi_loss_sums_masked_squares_over_twice_the_masked_locations():
    student = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    teacher = [torch.ones(1, 2, 2, 2) * 3, torch.ones(1, 2, 1, 1)]
    masks = [torch.tensor([[[True, False], [False, False]]]), torch.tensor([[[True]]])]
    # masked: one fine cell (2 channels x 9) and the coarse cell (2 channels x 1) -> 20 / (2 * 2)
    assert fgfi_loss(student, teacher, masks).item() == pytest.approx(5.0)
    empty = [torch.zeros_like(m) for m in masks]
    student[0].requires_grad_()
    zero = fgfi_loss(student, teacher, empty)
    assert zero.item() == 0.0 and zero.requires_grad


def test_defeat_normalises_foreground_and_background_by_twice_their_own_counts():
    student = torch.zeros(1, 2, 2, 2)
    teacher = torch.tensor([[[[2.0, 1.0], [1.0, 1.0]], [[2.0, 1.0], [1.0, 1.0]]]])
    fg = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    fg_loss, bg_loss = defeat_losses([student], [teacher], [fg])
    # the authors' code: squares / (2 x elements), channels included
    assert fg_loss.item() == pytest.approx(2.0)  # (4 + 4) / (2 x 1 cell x 2 channels)
    assert bg_loss.item() == pytest.approx(0.5)  # 6 x 1 / (2 x 3 cells x 2 channels)


def test_defeat_averages_over_all_levels_a_level_without_foreground_adding_zero():
    student = [torch.zeros(1, 1, 1, 2, requires_grad=True), torch.zeros(1, 1, 1, 1)]
    teacher = [torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[4.0]]]])]
    fg = [torch.tensor([[[1.0, 0.0]]]), torch.zeros(1, 1, 1)]
    fg_loss, bg_loss = defeat_losses(student, teacher, fg)
    # as the authors' code divides by the number of levels: the foreground's weight against
    # the background's does not depend on how many levels hold objects
    assert fg_loss.item() == pytest.approx((4.0 / 2 + 0.0) / 2)
    assert bg_loss.item() == pytest.approx((0.0 + 16.0 / 2) / 2)
    no_objects = [torch.zeros_like(m) for m in fg]
    zero, _ = defeat_losses(student, teacher, no_objects)
    assert zero.item() == 0.0 and zero.requires_grad  # DDP still sees the student used


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_rank_mimic_loss_is_zero_for_equal_scores_and_positive_when_the_order_differs(score):
    teacher = [torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.5, 2.0])]
    equal = rank_mimic_loss(teacher, [t.clone() for t in teacher], score)
    assert equal.item() == pytest.approx(0.0, abs=1e-7)
    swapped = [torch.tensor([0.0, 1.0, 3.0]), torch.tensor([2.0, 0.5])]
    assert rank_mimic_loss(teacher, swapped, score).item() > 0.01


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_rank_mimic_loss_is_unchanged_when_both_sides_permute_their_anchors_together(score):
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(7, generator=gen), torch.randn(3, generator=gen)]
    student = [torch.randn(7, generator=gen), torch.randn(3, generator=gen)]
    perms = [torch.randperm(7, generator=gen), torch.randperm(3, generator=gen)]
    loss = rank_mimic_loss(teacher, student, score)
    permuted = rank_mimic_loss(
        [t[p] for t, p in zip(teacher, perms)], [s[p] for s, p in zip(student, perms)], score
    )
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-5)
    # sorting each side on its own, as one public port does, is a different (wrong) quantity
    sorted_each = rank_mimic_loss(
        [t.sort().values for t in teacher], [s.sort().values for s in student], score
    )
    assert sorted_each.item() != pytest.approx(loss.item(), rel=1e-3)


def test_rank_mimic_loss_on_probabilities_is_the_kl_of_softmaxes_over_sigmoids_and_stays_bounded():
    """The "probability" score (MODEL.DISTILL.RANK.SCORE): a softmax over values in [0, 1] puts
    at most e times more mass on one candidate than on another, so a confident teacher (log-odds
    far apart) cannot make a near one-hot target: the KL stays below 2 per GT, where the logits'
    grows with the teacher's confidence."""
    gen = torch.Generator().manual_seed(1)
    teacher = [50 * torch.randn(5, generator=gen), 50 * torch.randn(4, generator=gen)]
    student = [torch.randn(5, generator=gen), torch.randn(4, generator=gen)]
    expected = torch.stack(
        [
            F.kl_div(
                F.log_softmax(s.sigmoid(), 0), F.log_softmax(t.sigmoid(), 0),
                reduction="sum", log_target=True,
            )
            for t, s in zip(teacher, student)
        ]
    ).mean()
    loss = rank_mimic_loss(teacher, student, "probability")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < loss.item() < 2.0
    assert rank_mimic_loss(teacher, student, "logit").item() > 10 * loss.item()
    with pytest.raises(ValueError, match="MODEL.DISTILL.RANK.SCORE"):
        rank_mimic_loss(teacher, student, "rank")


def test_pfi_weights_each_location_by_the_prediction_difference():
    student = torch.zeros(1, 2, 1, 2, requires_grad=True)
    teacher = torch.ones(1, 2, 1, 2)  # the same feature gap at both locations
    s_logits = torch.zeros(1, 3, 1, 2, requires_grad=True)
    t_logits = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]], [[1.0, 3.0]]]])  # gaps 1 and 3
    loss = pfi_loss([student], [teacher], [s_logits], [t_logits])
    assert loss.item() == pytest.approx((1.0 * 1 + 9.0 * 1) / 2)
    loss.backward()
    grad = student.grad[0, 0, 0]
    assert grad[1] / grad[0] == pytest.approx(9.0)  # the location the predictions disagree on
    assert s_logits.grad is None  # the weight guides, it is not trained


def test_pfi_on_probabilities_weighs_disagreement_not_a_calibration_offset():
    """An RPN's objectness sits far below a focal-loss student's logits where both say
    "background": the logit gap there outweighs a real disagreement, the probability gap does
    not (MODEL.DISTILL.PFI.PREDICTION_GAP)."""
    student = torch.zeros(1, 2, 1, 2, requires_grad=True)
    teacher = torch.ones(1, 2, 1, 2)  # the same feature gap at both locations
    s_logits = torch.tensor([[[[-4.0, -1.0]]]])
    t_logits = torch.tensor([[[[-11.0, 3.0]]]])  # background both / an object the student misses
    by_logit = pfi_loss([student], [teacher], [s_logits], [t_logits])
    assert by_logit.item() == pytest.approx((49.0 + 16.0) / 2)  # the background weighs more
    loss = pfi_loss([student], [teacher], [s_logits], [t_logits], prediction_gap="probability")
    gaps = (t_logits.sigmoid() - s_logits.sigmoid()).pow(2)[0, 0, 0]
    assert loss.item() == pytest.approx(gaps.mean().item())
    loss.backward()
    grad = student.grad[0, 0, 0]
    assert grad[1] / grad[0] > 1000  # nearly all of it where the predictions disagree
    with pytest.raises(ValueError, match="MODEL.DISTILL.PFI.PREDICTION_GAP"):
        pfi_loss([student], [teacher], [s_logits], [t_logits], prediction_gap="softmax")
