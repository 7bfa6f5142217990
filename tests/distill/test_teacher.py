"""The teacher cannot be silently wrong: strict loading, frozen, eval mode kept."""

import pytest
import torch
from torch import nn

from mimicdet.distill import FrozenTeacher, load_teacher_weights


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _save(tmp_path, state):
    path = tmp_path / "teacher.pth"
    torch.save({"model": state}, path)
    return str(path)


def test_a_complete_checkpoint_loads_every_tensor(tmp_path):
    trained = _teacher()
    for p in trained.parameters():
        p.data.normal_()
    path = _save(tmp_path, trained.state_dict())
    model = _teacher()
    load_teacher_weights(model, path)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("1.running_var"), r"missing from the file: 1\.running_var"),
        (lambda s: s.__setitem__("head.weight", torch.zeros(1)), r"not in the model: head\.weight"),
        (lambda s: s.__setitem__("3.weight", torch.zeros(2, 4, 3, 3)), r"other shapes: 3\.weight"),
    ],
)
def test_a_teacher_checkpoint_that_does_not_match_fails_naming_the_tensor(tmp_path, edit, message):
    state = _teacher().state_dict()
    edit(state)
    with pytest.raises(ValueError, match=message):
        load_teacher_weights(_teacher(), _save(tmp_path, state))


def test_a_teacher_without_weights_is_refused():
    with pytest.raises(ValueError, match="teacher has no weights"):
        load_teacher_weights(_teacher(), "")


def test_the_teacher_stays_frozen_and_in_eval_mode_when_the_student_trains():
    teacher = FrozenTeacher(_teacher())
    assert not any(m.training for m in teacher.modules())
    student = nn.ModuleDict({"teacher": teacher, "body": nn.Conv2d(3, 2, 1)})
    student.train()
    assert student["body"].training and not any(m.training for m in teacher.modules())
    bn = teacher.model[1]
    before = bn.running_mean.clone()
    out = teacher(torch.randn(2, 3, 8, 8) * 5 + 3)
    assert torch.equal(bn.running_mean, before)  # eval-mode BatchNorm: statistics untouched
    assert not out.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
