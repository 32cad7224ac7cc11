"""Output kinds (#27): the kind, loss and fidelity chosen for each output layout, the batch dim
measured (never guessed from sizes), every fidelity figure within its range, CTC decoding,
and floors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.compiler.fidelity import MEASURE_FUNCTIONS, edit_distance, fidelity, greedy_decode, measure_outputs
from spruce.compiler.floors import check_floor_names, check_floors
from spruce.compiler.kinds import KINDS, MEASURES, Floor, parse_floor
from spruce.compiler.outputs import OutputError, batch_dims, distill_loss, plan_outputs
from torch import nn

N, T, C = 4, 4, 5  # T = N: a size rule could not tell the time-major batch dim apart


class Head(nn.Module):
    """A linear head over a sequence (N, T, F), its scores returned in ``layout``."""

    def __init__(self, layout: str):
        super().__init__()
        self.layout, self.linear = layout, nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.linear(x)  # (N, T, C)
        if self.layout == "NC":
            return scores.mean(1)
        if self.layout == "TNC":
            return scores.transpose(0, 1)
        if self.layout == "NCHW":
            return scores.transpose(1, 2)[..., None].expand(-1, -1, -1, 3)  # (N, C, T, 3)
        return scores


def _plan(layout: str, declarations=None):
    model = Head(layout).eval()
    example = torch.randn(N, T, 6)
    outputs = model(example)
    return model, plan_outputs(outputs, declarations=declarations, batch=batch_dims(model, example, outputs))


@pytest.mark.parametrize("layout, kind, batch_dim, class_dim, loss, measures", [
    ("NC", "scores", 0, 1, "kl", {"top1_agreement", "relative_l2", "cosine"}),
    ("NTC", "scores", 0, 2, "kl", {"top1_agreement", "relative_l2", "cosine"}),
    ("TNC", "scores", 1, 2, "kl", {"top1_agreement", "relative_l2", "cosine"}),
    ("NCHW", "map", 0, None, "mse", {"relative_l2", "cosine"}),
])
def test_the_kind_loss_and_fidelity_follow_the_layout(layout, kind, batch_dim, class_dim, loss, measures):
    dense, plan = _plan(layout)
    (spec,) = plan.outputs
    assert (spec.kind, spec.batch_dim, spec.class_dim, spec.loss) == (kind, batch_dim, class_dim, loss)
    assert not spec.declared and "guessed" in plan.record()[0]["kind_from"] and plan.warnings()
    torch.manual_seed(1)
    other = Head(layout)
    batches = [torch.randn(3, T, 6), torch.randn(2, T, 6)]
    same = fidelity(dense, dense, batches, plan).per_output["output"]
    far = fidelity(other, dense, batches, plan).per_output["output"]
    assert set(same) == measures == set(far) and far["relative_l2"] > 0.1
    assert same["cosine"] == pytest.approx(1.0) and same["relative_l2"] == 0.0
    if "top1_agreement" in same:
        assert same["top1_agreement"] == 1.0
    assert -1.0 <= far["cosine"] <= 1.0  # averaged over samples of the output's own batch dim


def test_time_major_agreement_is_per_position_over_the_class_dim():
    dense, plan = _plan("TNC")
    scores = dense(torch.randn(3, T, 6)).detach()
    changed = scores.clone()
    changed[0, 1] = -changed[0, 1]  # one position (time 0, sample 1) flips its scores: its argmax moves
    values = measure_outputs([(changed, scores)], plan)["output"]
    assert values["top1_agreement"] == pytest.approx(1 - 1 / (T * 3))
    # per-position KL over the class dim is zero only at the teacher; the temperature scales it
    assert float(distill_loss(scores, scores, plan)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(changed, scores, plan)) > 0


def test_declared_kinds_override_the_rule():
    _, plan = _plan("NCHW", {"output": {"kind": "pixel_scores"}})
    (spec,) = plan.outputs
    assert (spec.kind, spec.class_dim, spec.loss, spec.declared) == ("pixel_scores", 1, "kl", True)
    assert "miou" in spec.measures and not plan.warnings() and plan.record()[0]["kind_from"] == "declared"
    _, plan = _plan("TNC", {"out*": {"kind": "ctc", "class_dim": -1, "blank": 0}})
    assert (plan.outputs[0].kind, plan.outputs[0].class_dim, plan.outputs[0].blank) == ("ctc", 2, 0)
    with pytest.raises(OutputError, match="blank 9 is not a class"):
        _plan("TNC", {"output": {"kind": "ctc", "blank": 9}})
    with pytest.raises(OutputError, match="needs 3 dims"):
        _plan("NC", {"output": {"kind": "ctc"}})
    with pytest.raises(OutputError, match="class dim of output is its batch dim"):
        _plan("TNC", {"output": {"kind": "scores", "class_dim": 1}})
    with pytest.raises(OutputError, match="names no output"):
        _plan("NC", {"logits": {"kind": "scores"}})


def test_the_batch_dim_is_measured_and_an_output_that_does_not_follow_it_is_a_map():
    class Pooled(nn.Module):
        def forward(self, x):
            return x.mean(0)[:, :C]  # (T, C) whatever the batch: no batch dim

    outputs = Pooled()(torch.randn(N, T, 6))
    plan = plan_outputs(outputs, batch=batch_dims(Pooled(), torch.randn(N, T, 6), outputs))
    assert (plan.outputs[0].kind, plan.outputs[0].batch_dim) == ("map", None)


def test_miou_and_ctc_measures():
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 0] = 1.0  # every pixel class 0
    compiled = dense.clone()
    compiled[0, 1, 0, 0] = 5.0  # one pixel class 1
    _, plan = _plan("NCHW", {"output": {"kind": "pixel_scores"}})
    values = measure_outputs([(compiled, dense)], plan)["output"]
    assert values["miou"] == pytest.approx((3 / 4 + 0 / 1) / 2)  # class 0: IoU 3/4; class 1: 0/1
    assert greedy_decode([0, 1, 1, 0, 1, 2, 2, 0], blank=0) == [1, 1, 2]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 4]) == 2
    _, plan = _plan("TNC", {"output": {"kind": "ctc"}})
    labels = torch.tensor([[0, 1, 1, 0], [2, 0, 2, 2]])  # (N, T): decodes [1] and [2, 2]
    dense = torch.nn.functional.one_hot(labels, C).float().transpose(0, 1)  # time-major (T, N, C)
    compiled = dense.clone()
    compiled[1, 1] = torch.nn.functional.one_hot(torch.tensor(2), C).float()  # sample 1 now decodes [2]
    values = measure_outputs([(compiled, dense)], plan)["output"]
    assert values["sequence_agreement"] == 0.5 and values["cer"] == pytest.approx(1 / 3)
    assert values["top1_agreement"] == pytest.approx(7 / 8)


LAYOUTS = st.sampled_from([("NC", None), ("NTC", None), ("TNC", None), ("NCHW", None),
                           ("NCHW", {"output": {"kind": "pixel_scores"}}), ("TNC", {"output": {"kind": "ctc"}}),
                           ("NTC", {"output": {"kind": "ctc", "blank": 2}})])


@settings(max_examples=25, deadline=None)
@given(layout=LAYOUTS, seed=st.integers(0, 2 ** 16), scale=st.floats(1e-3, 1e3), batches=st.integers(1, 3))
def test_every_fidelity_figure_lies_in_its_range(layout, seed, scale, batches):
    name, declarations = layout
    dense, plan = _plan(name, declarations)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(batches):
        x = torch.randn(int(torch.randint(1, 5, (1,), generator=generator)), T, 6, generator=generator)
        want = dense(x).detach()
        pairs.append((want + scale * torch.randn(want.shape, generator=generator) * torch.rand(1, generator=generator),
                      want))
    for measure, value in measure_outputs(pairs, plan)["output"].items():
        low, high = MEASURES[measure].low, MEASURES[measure].high
        assert low <= value <= high and not math.isnan(value), (measure, value)


def test_the_registries_agree():
    assert set(MEASURE_FUNCTIONS) == set(MEASURES)
    for kind in KINDS.values():
        assert kind.floor is None or kind.floor.measure in kind.measures
    assert list(KINDS)[-1] == "map"  # the fallback is tried last


def test_floors_parse_resolve_and_judge():
    assert parse_floor("output[0]:cosine>=0.8") == Floor("cosine", ">=", 0.8, "output[0]")
    assert parse_floor(" cer <= 0.05 ") == Floor("cer", "<=", 0.05)
    for bad in ("cosine > 0.5", "cosine>=1.5", ">=0.3"):
        with pytest.raises(ValueError):
            parse_floor(bad)
    _, plan = _plan("TNC", {"output": {"kind": "ctc"}})
    per_output = {"output": {"sequence_agreement": 0.85, "cer": 0.04, "cosine": 0.99}}
    default = check_floors(None, plan, per_output, {})
    assert not default.met and default.record()["missed"] == ["output sequence_agreement 0.85 (floor >= 0.9)"]
    given_floors = check_floors(("cer<=0.05", "word_acc>=0.95"), plan, per_output, {"word_acc": 0.97})
    assert given_floors.met and given_floors.source == "recipe" and len(given_floors.checks) == 2
    assert not check_floors(("word_acc>=0.95",), plan, per_output, {}).met  # a missing value misses
    assert check_floors((), plan, per_output, {}).met
    check_floor_names(("cer<=0.05", "word_acc>=0.9"), plan, ["word_acc"])
    for floors, names, message in ((("miou>=0.5",), None, "no output of kind with measure miou"),
                                   (("word_acc>=0.9",), None, "needs evaluate"),
                                   (("word_acc>=0.9",), ["cer"], "evaluate returns no 'word_acc'"),
                                   (("logits:cosine>=0.5",), None, "no output 'logits'")):
        with pytest.raises(ValueError, match=message):
            check_floor_names(floors, plan, names)


def test_the_recipe_and_the_command_line_declare_kinds_and_floors():
    from spruce.cli.compile import recipe_from_args
    from spruce.cli.main import build_parser
    from spruce.compiler.recipes import Recipe, RecipeError

    args = build_parser().parse_args(["compile", "--out", "x", "--output", "output=ctc,class_dim=-1,blank=0",
                                      "--floor", "cer<=0.1", "--floor", "word_acc>=0.95"])
    recipe = recipe_from_args(args)
    assert recipe.outputs["output"].record() == {"kind": "ctc", "class_dim": -1, "blank": 0}
    assert recipe.floor == ("cer<=0.1", "word_acc>=0.95")
    assert recipe_from_args(build_parser().parse_args(["compile", "--out", "x", "--floor", "none"])).floor == ()
    assert Recipe.from_mapping(recipe.to_dict()) == recipe
    for document, message in (({"outputs": {"output": {"kind": "logits"}}}, "unknown output kind 'logits'"),
                              ({"outputs": {"output": {"kind": "map", "blank": 0}}}, "no blank index"),
                              ({"floor": ["cosine>0.5"]}, "a floor must look like")):
        with pytest.raises(RecipeError, match=message):
            Recipe.from_mapping(document)
