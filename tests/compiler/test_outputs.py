"""Outputs of any structure (named tensors, kinds, distillation losses, fidelity) and
BatchNorm re-estimation (#14)."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from spruce.compiler.fidelity import fidelity
from spruce.compiler.outputs import (
    WEIGHTED_MSE_ALPHA,
    OutputError,
    calibrate_scales,
    distill_loss,
    flatten_outputs,
    plan_outputs,
)
from spruce.compiler.recovery import recover, reestimate_batchnorm
from torch import nn

Heads = namedtuple("Heads", "boxes scores")


@dataclasses.dataclass
class Detection:
    maps: torch.Tensor
    label: str = "x"


def _leading(outputs) -> dict[str, int]:
    """Every output's batch dim at dim 0 (as compile measures it for these layouts)."""
    return {name: 0 for name, _ in flatten_outputs(outputs)}


def test_every_tensor_of_any_structure_is_named_by_its_path():
    value = {"det": Detection(torch.ones(1, 2, 4, 4)), "heads": Heads(torch.ones(1, 4), [torch.ones(1, 3), None, 7])}
    assert [name for name, _ in flatten_outputs(value)] == [
        "output['det'].maps", "output['heads'].boxes", "output['heads'].scores[0]"]
    assert flatten_outputs((None, "text")) == []


def test_kinds_default_losses_and_overrides():
    outputs = (torch.randn(2, 10), torch.randn(2, 8, 8, 2), torch.randn(2))
    plan = plan_outputs(outputs, batch=_leading(outputs))
    assert [(s.kind, s.loss) for s in plan.outputs] == [("scores", "kl"), ("map", "mse"), ("map", "mse")]
    # exact path, then a glob
    plan = plan_outputs(outputs, {"output[1]": "l1", "output[[]2]": "l1"}, batch=_leading(outputs))
    assert [s.loss for s in plan.outputs] == ["kl", "l1", "l1"]
    assert plan.record()[1] == {"output": "output[1]", "shape": [2, 8, 8, 2], "kind": "map",
                                "kind_from": "guessed: 4-D outputs are maps unless declared", "batch_dim": 0,
                                "class_dim": None, "distill_loss": "l1", "loss_from": "override",
                                "teacher_scale": None}
    with pytest.raises(OutputError, match="names no output"):
        plan_outputs(outputs, {"output[7]": "l1"})
    with pytest.raises(OutputError, match="unknown loss 'huber'"):
        plan_outputs(outputs, {"output[0]": "huber"})
    with pytest.raises(OutputError, match="hold no tensor"):
        plan_outputs({"n": 3})


def test_distillation_is_zero_only_at_the_teacher():
    teacher = (torch.randn(4, 10), torch.randn(4, 2, 8, 8))
    plan = plan_outputs(teacher, batch=_leading(teacher))
    assert float(distill_loss(teacher, teacher, plan)) == pytest.approx(0.0, abs=1e-6)
    student = (teacher[0] + torch.randn(4, 10), teacher[1])
    assert float(distill_loss(student, teacher, plan)) > 1e-3
    student = (teacher[0], teacher[1] * 1.1)
    assert float(distill_loss(student, teacher, plan)) == pytest.approx(0.01, rel=1e-4)  # MSE / teacher's mean square


def test_weighted_mse_weighs_the_teachers_text_above_its_background():
    teacher = torch.zeros(1, 8, 8, 2)
    teacher[0, 2, 3, 0] = 1.0  # one confident element in a background of zeros
    plan = plan_outputs((teacher,), {"output[0]": "weighted_mse"})
    assert plan.outputs[0].loss == "weighted_mse" and plan.record()[0]["loss_from"] == "override"
    assert float(distill_loss((teacher,), (teacher,), plan)) == pytest.approx(0.0, abs=1e-7)
    on_text, on_background = teacher.clone(), teacher.clone()
    on_text[0, 2, 3, 0] -= 0.5  # the same error where the teacher says 1 ...
    on_background[0, 5, 5, 1] += 0.5  # ... and where it says 0
    weighted = [float(distill_loss((s,), (teacher,), plan)) for s in (on_text, on_background)]
    assert weighted[0] == pytest.approx((1 + WEIGHTED_MSE_ALPHA) * weighted[1])
    plain = plan_outputs((teacher,))
    assert float(distill_loss((on_text,), (teacher,), plain)) == pytest.approx(
        float(distill_loss((on_background,), (teacher,), plain)))  # plain MSE cannot tell them apart
    assert float(distill_loss((teacher * 0.9,), (teacher,), plan)) == pytest.approx(0.01, rel=1e-4)  # scale-free


def _heat_maps(text: bool) -> torch.Tensor:
    """A batch of 2 heat maps (N, H, W, 2) in [0, 1]: a few confident elements, or none."""
    maps = torch.full((2, 8, 8, 2), 0.001)
    if text:
        maps[:, 2:4, 3:6, :] = 0.9
    return maps


def test_a_data_set_scale_gives_a_batch_without_text_the_weight_of_its_error():
    text, plain = _heat_maps(True), _heat_maps(False)
    plan = plan_outputs((text,), {"output[0]": "weighted_mse"})
    # the same error of 0.1 on every element: the batch's own scale weighs the text-free batch ~10^4 times more
    per_batch = [float(distill_loss((t + 0.1,), (t,), plan)) for t in (text, plain)]
    assert per_batch[1] > 1000 * per_batch[0]
    identity = nn.Identity()
    calibrated = calibrate_scales(plan, identity, [text, plain, text, plain], max_batches=3)
    scale = calibrated.outputs[0].scale
    weight = 1 + WEIGHTED_MSE_ALPHA * torch.cat([text, plain, text])
    assert scale == pytest.approx(float((weight * torch.cat([text, plain, text]) ** 2).mean()), rel=1e-5)
    assert calibrated.record()[0]["teacher_scale"] == scale and plan.outputs[0].scale is None
    fixed = [float(distill_loss((t + 0.1,), (t,), calibrated)) for t in (text, plain)]
    for teacher, loss in zip((text, plain), fixed):
        error = float((1 + WEIGHTED_MSE_ALPHA * teacher).mul(0.01).mean())
        assert loss == pytest.approx(error / scale, rel=1e-5)
    assert fixed[0] > fixed[1]  # the text batch's error is weighted more, not less
    kl = calibrate_scales(plan_outputs(torch.randn(2, 5), batch={"output": 0}), identity, [torch.randn(2, 5)])
    assert kl.outputs[0].scale is None  # kl needs no scale
    with pytest.raises(OutputError, match="no batch"):
        calibrate_scales(plan, identity, [])


def test_distillation_divides_by_the_teacher_scale_measured_before_recovery():
    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 2, 3, padding=1)
    student = nn.Conv2d(3, 2, 3, padding=1)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    plan = plan_outputs(teacher(batches[0]).detach())
    log = recover(student, teacher, batches, "distill", plan, epochs=1, lr=1e-3, quiet=True)
    with torch.no_grad():
        expected = torch.cat([teacher(x) for x in batches]).pow(2).mean()
    assert log.teacher_scales == {"output": pytest.approx(float(expected), rel=1e-5)}
    assert log.record()["teacher_scales"] == log.teacher_scales


def test_fidelity_per_output():
    torch.manual_seed(0)
    dense = nn.Linear(6, 5)
    same = fidelity(dense, dense, [torch.randn(8, 6)], plan_outputs(torch.randn(1, 5), batch={"output": 0}))
    assert same.per_output["output"] == {"relative_l2": 0.0, "cosine": pytest.approx(1.0),
                                         "top1_agreement": 1.0}
    other = nn.Linear(6, 5)
    plan = plan_outputs(torch.randn(1, 5), batch={"output": 0})
    far = fidelity(other, dense, [torch.randn(8, 6), torch.randn(4, 6)], plan)
    assert far.samples == 12 and far.per_output["output"]["relative_l2"] > 0.3


def test_batchnorm_re_estimation_gives_the_calibration_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(8, 3, 10, 10) * 3 + 1 for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 1
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        features = torch.cat([model[0](x) for x in batches])
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    # the cumulative average of per-batch unbiased variances
    per_batch = torch.stack([model[0](x).detach().var((0, 2, 3), unbiased=True) for x in batches])
    torch.testing.assert_close(model[1].running_var, per_batch.mean(0), rtol=1e-4, atol=1e-4)


class _SequenceHead(nn.Module):
    """(N, 1, H, W) images -> per-position class scores (N, W, C), or time-major (W, N, C)."""

    def __init__(self, classes: int, blank_bias: float, time_major: bool):
        super().__init__()
        self.head = nn.Linear(4, classes)
        self.time_major = time_major
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[3] = blank_bias  # class 3 wins at most positions when the bias is large

    def forward(self, x):
        features = x[:, 0].transpose(1, 2)  # (N, W, H = 4)
        scores = self.head(features)
        return scores.transpose(0, 1) if self.time_major else scores


@pytest.mark.parametrize("time_major", [False, True])
def test_a_guessed_sequence_output_dominated_by_one_class_is_guessed_ctc_with_that_blank(time_major):
    from spruce.compiler.outputs import batch_dims, guess_ctc_blanks
    torch.manual_seed(0)
    batches = [torch.randn(5, 1, 4, 6) for _ in range(3)]  # N = 5, W = T = 6 (T != N); T = N below
    for blank_bias, expected in ((6.0, "ctc"), (0.0, "scores")):
        model = _SequenceHead(11, blank_bias, time_major).eval()
        example = torch.randn(1, 1, 4, 1)  # T = N = 1 at the example: the batch dim is measured, not guessed
        outputs = model(example)
        plan = plan_outputs(outputs, batch=batch_dims(model, example, outputs))
        assert plan.outputs[0].kind == "scores"
        guessed = guess_ctc_blanks(plan, model, batches).outputs[0]
        assert guessed.kind == expected, (blank_bias, guessed)
        if expected == "ctc":
            assert guessed.blank == 3 and guessed.loss == "kl" and not guessed.declared
            assert guessed.warning() is not None  # still a guess: the report warns
        else:
            assert guessed.blank is None


def test_a_declared_sequence_output_is_never_re_guessed():
    from spruce.compiler.kinds import OutputDeclaration
    from spruce.compiler.outputs import guess_ctc_blanks
    model = _SequenceHead(11, 6.0, False).eval()
    example = torch.randn(2, 1, 4, 6)
    plan = plan_outputs(model(example), declarations={"output": OutputDeclaration(kind="scores")},
                        batch={"output": 0})
    assert guess_ctc_blanks(plan, model, [example]).outputs[0].kind == "scores"


def test_hard_weighted_mse_weighs_a_false_positive_as_a_miss():
    teacher = torch.zeros(1, 8, 8, 2)
    teacher[0, 2, 3, 0] = 1.0
    hard, soft = (plan_outputs((teacher,), {"output[0]": name}) for name in ("hard_weighted_mse", "weighted_mse"))
    assert float(distill_loss((teacher,), (teacher,), hard)) == pytest.approx(0.0, abs=1e-7)
    missed, false_positive = teacher.clone(), teacher.clone()
    missed[0, 2, 3, 0] = 0.0  # the student misses the teacher's text ...
    false_positive[0, 5, 5, 1] = 1.0  # ... or lights up background the teacher leaves dark
    losses = [float(distill_loss((s,), (teacher,), hard)) for s in (missed, false_positive)]
    assert losses[0] == pytest.approx(losses[1])
    soft_loss = float(distill_loss((false_positive,), (teacher,), soft))
    assert soft_loss == pytest.approx(losses[1] / (1 + WEIGHTED_MSE_ALPHA))  # weighted_mse: 11 times less
    student = (teacher + 0.3).requires_grad_()
    distill_loss((student,), (teacher,), hard).backward()  # no gradient through the weight: 2 w (s - t) / N / scale
    weight = 1 + WEIGHTED_MSE_ALPHA * torch.maximum(teacher, teacher + 0.3)
    scale = float(((1 + WEIGHTED_MSE_ALPHA * teacher) * teacher ** 2).mean())
    assert torch.allclose(student.grad, 2 * weight * 0.3 / teacher.numel() / scale, rtol=1e-4)
