"""Target options go through the one validation mechanism (pydantic ``Config``), like recipes and
method configs: every registered target declares its ``Options``, whose defaults are the
constructor's and whose refusals name the target, the option and the value."""

from __future__ import annotations

import inspect

import pytest
from spruce.passes.config import Config, ConfigError
from spruce.targets.base import TARGETS, TargetOptions, check_target_options, get_target, target_class


def _registered() -> list[str]:
    target_class("onnxruntime")  # loads every target module
    return sorted(TARGETS)


@pytest.mark.parametrize("name", _registered())
def test_every_target_declares_options_matching_its_constructor(name):
    cls = target_class(name)
    assert issubclass(cls.Options, TargetOptions) and issubclass(cls.Options, Config)
    assert cls.Options is not TargetOptions, f"{name} declares no options model"
    parameters = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}
    fields = {k: f.default for k, f in cls.Options.model_fields.items()}
    assert set(parameters) == set(fields)
    for key, default in parameters.items():  # one source of defaults: the two agree
        assert fields[key] == default or tuple(fields[key] or ()) == tuple(default or ()), key


@pytest.mark.parametrize("name, options, message", [
    ("onnxruntime", {"threads": 0}, "target onnxruntime: threads must be >= 1, got 0"),
    ("onnxruntime", {"threads": True}, "threads must be an integer"),
    ("onnxruntime", {"optimization": "max"}, "optimization must be one of"),
    ("onnxruntime", {"tolerance": -1.0}, "tolerance must be > 0"),
    ("onnxruntime", {"cores": 3},
     "unknown option cores, got 3 (valid: calibration, dynamic_batch, keep_fp32, optimization"),
    ("torch", {"semi_structured": True}, "semi_structured=True needs device='cuda'"),
    ("torch", {"device": "tpu"}, "device must be one of"),
    ("tensorrt", {"batch_sizes": "1,x"}, "batch_sizes must be positive integers"),
    ("tensorrt", {"batch_sizes": [1, 0]}, "batch_sizes.1 must be >= 1, got 0"),
    ("tensorrt", {"workspace_mb": 0}, "workspace_mb must be >= 1"),
])
def test_bad_target_options_are_refused_naming_target_option_and_value(name, options, message):
    with pytest.raises(ConfigError) as caught:
        check_target_options(name, options)
    assert message in str(caught.value)
    with pytest.raises(ConfigError, match=message.split(",")[0].replace("(", r"\(").replace(")", r"\)")):
        get_target(name, **options)


def test_command_line_values_are_read_into_the_options_types():
    assert get_target("tensorrt", batch_sizes="1,8").batch_sizes == (1, 8)
    assert get_target("tensorrt", batch_sizes=4).batch_sizes == (4,)
    assert get_target("onnxruntime", threads=2, tolerance=1).tolerance == 1.0
    assert get_target("torch", dtype="bfloat16").dtype == "bfloat16"


def test_an_unknown_target_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown target 'gpu'; valid: .*onnxruntime"):
        get_target("gpu")
