"""Dual-path cosine mimic loss."""

import torch
from detectron2.structures import Instances

from mimicdet.modeling import cosine_mimic_loss, dual_path_mimic_losses, sample_mimic_boxes


def test_cosine_mimic_loss_bounds():
    x = torch.randn(5, 16)
    torch.testing.assert_close(
        cosine_mimic_loss(x, x.clone()), torch.tensor(0.0), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(cosine_mimic_loss(x, -3 * x), torch.tensor(2.0))
    orth = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(cosine_mimic_loss(*orth), torch.tensor(1.0))
    # the cosine is taken per row, over the feature axis: rescaling rows changes nothing
    scaled = x * torch.tensor([1.0, 2.0, 5.0, 0.5, 3.0])[:, None]
    torch.testing.assert_close(cosine_mimic_loss(x, scaled), torch.tensor(0.0), atol=1e-6, rtol=0)
    # rows at 90 and 0 degrees: (1 + 0) / 2 (over the batch axis it would be 0.53)
    student = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(cosine_mimic_loss(student, teacher), torch.tensor(0.5))
    empty = torch.zeros(0, 16, requires_grad=True)
    assert cosine_mimic_loss(empty, empty.detach()).item() == 0.0


def _boxes(anchor_index, teacher_cls, teacher_reg):
    inst = Instances((64, 64))
    inst.anchor_index = torch.tensor(anchor_index)
    inst.teacher_cls_logits = teacher_cls
    inst.teacher_reg_feats = teacher_reg
    return inst


def test_dual_path_reads_student_at_anchor_location():
    s_cls, s_reg = torch.randn(2, 10, 3), torch.randn(2, 10, 8)
    idx = [[1, 4], [7]]
    boxes = [_boxes(i, s_cls[n, i].clone(), s_reg[n, i].clone()) for n, i in enumerate(idx)]
    same = dual_path_mimic_losses(boxes, s_cls, s_reg)
    assert set(same) == {"loss_mimic_cls", "loss_mimic_reg"}
    assert all(abs(v.item()) < 1e-6 for v in same.values())

    boxes = [_boxes(i, -s_cls[n, i], -s_reg[n, i]) for n, i in enumerate(idx)]
    opposite = dual_path_mimic_losses(boxes, s_cls, s_reg)
    assert all(abs(v.item() - 2.0) < 1e-5 for v in opposite.values())

    assert set(dual_path_mimic_losses(boxes, s_cls, None, paths=["cls"])) == {"loss_mimic_cls"}


def test_teacher_detached_or_not():
    s = torch.randn(1, 4, 6, requires_grad=True)
    t = torch.randn(2, 6, requires_grad=True)
    boxes = [_boxes([0, 2], torch.randn(2, 3), t)]
    loss = dual_path_mimic_losses(boxes, None, s, paths=["reg"], detach_teacher=True)
    loss["loss_mimic_reg"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    loss = dual_path_mimic_losses(boxes, None, s, paths=["reg"], detach_teacher=False)
    loss["loss_mimic_reg"].backward()
    assert t.grad.abs().sum() > 0


def test_mimic_sample_excludes_gt_boxes_and_caps_per_image():
    inst = Instances((64, 64))
    inst.anchor_index = torch.tensor([3, -1, 5, 9, -1, 2])
    picked = sample_mimic_boxes([inst], num_per_image=3)[0]
    assert len(picked) == 3 and (picked.anchor_index >= 0).all()
    assert len(set(picked.anchor_index.tolist())) == 3
    assert len(sample_mimic_boxes([inst], num_per_image=64)[0]) == 4
