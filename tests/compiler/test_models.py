"""Model specs resolve to real models in eval mode with matching example inputs."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch
from spruce.compiler.models import DEFAULT_INPUT_SHAPE, ModelSpecError, resolve_model
from torch import nn

FACTORY_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    EXAMPLE_INPUTS = (torch.ones(2, 4),)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    def make():
        return Tiny()

    def make_with_inputs():
        return Tiny(), torch.zeros(5, 4)

    def make_two_inputs():
        return Tiny(), [torch.zeros(1, 4), torch.zeros(1, 4)]

    def make_bad():
        return 42

    def make_raising():
        raise RuntimeError("no weights here")
    """
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _output(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# --- torchvision -------------------------------------------------------------------


def test_torchvision_model_is_eval_with_imagenet_input() -> None:
    model, inputs = resolve_model("torchvision:resnet18")
    assert not model.training
    assert [tuple(t.shape) for t in inputs] == [DEFAULT_INPUT_SHAPE]
    assert _output(model, inputs).shape == (1, 1000)


def test_inception_v3_gets_299_input() -> None:
    model, inputs = resolve_model("torchvision:inception_v3")
    assert [tuple(t.shape) for t in inputs] == [(1, 3, 299, 299)]
    assert not model.training


def test_input_shapes_override_and_inputs_are_seeded() -> None:
    _, first = resolve_model("torchvision:mobilenet_v3_small", [(2, 3, 64, 64)])
    _, second = resolve_model("torchvision:mobilenet_v3_small", [(2, 3, 64, 64)])
    assert tuple(first[0].shape) == (2, 3, 64, 64)
    assert torch.equal(first[0], second[0])


def test_unknown_torchvision_name_suggests_close_matches() -> None:
    with pytest.raises(ModelSpecError, match="resnet19.*did you mean.*resnet18"):
        resolve_model("torchvision:resnet19")


def test_torchvision_detection_models_are_not_classifiers() -> None:
    with pytest.raises(ModelSpecError, match="unknown torchvision model"):
        resolve_model("torchvision:fasterrcnn_resnet50_fpn")


# --- scheme errors -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "resnet18", "hub:resnet18", "model.onnx"])
def test_unresolvable_spec_names_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ModelSpecError, match="torchvision:NAME|empty"):
        resolve_model(spec)


def test_model_spec_error_is_a_value_error() -> None:
    assert issubclass(ModelSpecError, ValueError)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm_says_so() -> None:
    with pytest.raises(ModelSpecError, match="timm"):
        resolve_model("timm:resnet18")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_model_input_from_its_config() -> None:
    model, inputs = resolve_model("timm:resnet18")
    assert tuple(inputs[0].shape) == (1, 3, 224, 224)
    assert not model.training


# --- FILE.py:FACTORY ---------------------------------------------------------------


def test_factory_module_with_module_level_example_inputs(tmp_path: Path) -> None:
    file = _write(tmp_path / "zoo.py", FACTORY_FILE)
    model, inputs = resolve_model(f"{file}:make")
    assert not model.training
    assert [tuple(t.shape) for t in inputs] == [(2, 4)]
    assert _output(model, inputs).shape == (2, 3)


def test_factory_tuple_gives_its_own_inputs(tmp_path: Path) -> None:
    file = _write(tmp_path / "zoo.py", FACTORY_FILE)
    _, inputs = resolve_model(f"{file}:make_with_inputs")
    assert [tuple(t.shape) for t in inputs] == [(5, 4)]
    _, pair = resolve_model(f"{file}:make_two_inputs")
    assert len(pair) == 2


def test_factory_example_inputs_function_then_default(tmp_path: Path) -> None:
    with_function = FACTORY_FILE.replace(
        "EXAMPLE_INPUTS = (torch.ones(2, 4),)",
        "def example_inputs():\n    return torch.ones(7, 4)",
    )
    file = _write(tmp_path / "fn.py", with_function)
    _, inputs = resolve_model(f"{file}:make")
    assert [tuple(t.shape) for t in inputs] == [(7, 4)]

    without = FACTORY_FILE.replace("EXAMPLE_INPUTS = (torch.ones(2, 4),)", "")
    file = _write(tmp_path / "bare.py", without)
    _, inputs = resolve_model(f"{file}:make")
    assert [tuple(t.shape) for t in inputs] == [DEFAULT_INPUT_SHAPE]


def test_missing_factory_suggests_defined_callables(tmp_path: Path) -> None:
    file = _write(tmp_path / "zoo.py", FACTORY_FILE)
    with pytest.raises(ModelSpecError, match="no callable 'mak'.*did you mean make"):
        resolve_model(f"{file}:mak")


@pytest.mark.parametrize(
    ("factory", "message"),
    [("make_bad", "returned int"), ("make_raising", "raised RuntimeError: no weights")],
)
def test_bad_factory_is_a_spec_error(tmp_path: Path, factory: str, message: str) -> None:
    file = _write(tmp_path / "zoo.py", FACTORY_FILE)
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(f"{file}:{factory}")


def test_missing_python_file_and_missing_factory_part(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model(f"{tmp_path / 'absent.py'}:make")
    file = _write(tmp_path / "zoo.py", FACTORY_FILE)
    with pytest.raises(ModelSpecError, match="no factory"):
        resolve_model(str(file))


def test_python_file_that_fails_to_import(tmp_path: Path) -> None:
    file = _write(tmp_path / "broken.py", "import not_a_real_package_xyz\n")
    with pytest.raises(ModelSpecError, match="importing .*broken.py raised ModuleNotFoundError"):
        resolve_model(f"{file}:make")


# --- FILE.pt -----------------------------------------------------------------------


def test_saved_module_loads_with_default_or_given_shape(tmp_path: Path) -> None:
    saved = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    torch.save(saved, tmp_path / "net.pt")
    model, inputs = resolve_model(str(tmp_path / "net.pt"))
    assert not model.training
    assert [tuple(t.shape) for t in inputs] == [DEFAULT_INPUT_SHAPE]
    model, inputs = resolve_model(str(tmp_path / "net.pt"), [(1, 3, 8, 8)])
    assert torch.allclose(_output(model, inputs), _output(saved.eval(), inputs))


def test_saved_state_dict_is_rejected(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelSpecError, match="state dict"):
        resolve_model(str(tmp_path / "weights.pt"))


def test_missing_or_corrupt_pt_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model(str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ModelSpecError, match="cannot load"):
        resolve_model(str(tmp_path / "junk.pt"))
