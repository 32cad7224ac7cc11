"""INT8 artifacts of the ONNX Runtime target, on real ONNX Runtime sessions: the shipped file runs
integer kernels for (nearly) all of its convolution and matrix-product work, stays close to the
fp32 artifact on inputs it was not calibrated on, records how it was made, and bad precision
options are refused before any work."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from spruce.passes.config import ConfigError
from spruce.targets.base import check_precision, get_target, read_artifact
from spruce.targets.onnxruntime import OnnxRuntimeCPU
from spruce.targets.quantize import MIN_CALIBRATION_SAMPLES, cpu_isa_flags, integer_mac_share, quantization_mode
from torch import nn

SIDE = 32
# Largest |int8 - fp32| over a held-out batch of 64, relative to the largest |fp32| output.
# Measured 0.83-0.86 % on three held-out batches (U8S8, MinMax on 128 samples, ONNX Runtime 1.32,
# AVX-512 VNNI). One 8-bit step is 1/255 = 0.4 % of a tensor's range and seven quantized layers
# compound a few such steps; the bound leaves 3.5x room for other CPUs' kernels (7-bit weights
# without VNNI double the weight step). A wrong scale or zero point gives tens of percent.
INT8_ERROR_BOUND = 0.03
MIN_INTEGER_SHARE = 0.9


class Block(nn.Module):
    """A ResNet basic block (two 3x3 conv + BN, ReLU, identity or 1x1 projection shortcut)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet_like() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          Block(16, 16), Block(16, 32, 2), Block(32, 32),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for module in model.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fp32 and INT8 artifacts of the resnet-like CNN (calibrated on 128 samples of seed 1)."""
    folder = tmp_path_factory.mktemp("int8")
    model = resnet_like()
    example = (_inputs(1, 0),)
    calibration = [(x[None],) for x in _inputs(MIN_CALIBRATION_SAMPLES, 1)]
    fp32 = OnnxRuntimeCPU(threads=1).build(model, example, folder / "fp32.onnx")
    int8 = OnnxRuntimeCPU(threads=1, precision="int8").build(model, example, folder / "int8.onnx",
                                                             calibration_data=calibration)
    return model, fp32, int8


def _torch_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv and Linear multiply-accumulates of ``model`` at ``x``, counted by forward hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        per_output = (module.in_channels // module.groups * int(np.prod(module.kernel_size))
                      if isinstance(module, nn.Conv2d) else module.in_features)
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return total


def test_the_int8_artifact_runs_integer_kernels_and_the_fp32_one_would_fail(built):
    model, fp32, int8 = built
    x = _inputs(1, 0).numpy()
    shipped = integer_mac_share(int8.path, [x])
    reference = integer_mac_share(fp32.path, [x])
    # the counter is right: both graphs hold the model's MACs, as torch's modules count them
    macs = _torch_macs(model, torch.from_numpy(x))
    assert reference.float_macs == macs and shipped.integer_macs + shipped.float_macs == macs
    assert shipped.integer_share >= MIN_INTEGER_SHARE, shipped.nodes
    assert {op for op, _, _, integer in shipped.nodes if integer} <= {"QLinearConv", "QGemm", "ConvInteger",
                                                                       "MatMulInteger", "QLinearMatMul"}
    assert reference.integer_share < MIN_INTEGER_SHARE  # the same check on an fp32 build fails
    # the manifest says what was shipped, and the artifact reads back with it
    info = read_artifact(int8.path, "onnxruntime").info
    assert info["precision"] == "int8" and info["integer_mac_share"] == pytest.approx(shipped.integer_share)
    quantization = info["quantization"]
    assert quantization["mode"] == "static" and quantization["format"] == "QDQ"
    assert (quantization["activation_type"], quantization["weight_type"]) == ("uint8", "int8")
    assert quantization["per_channel"] and quantization["weight_symmetric"]
    assert quantization["calibration"] == "minmax" and quantization["calibration_samples"] == MIN_CALIBRATION_SAMPLES
    assert read_artifact(fp32.path).info["precision"] == "fp32"
    initializers = onnx.load(str(int8.path)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in initializers)


def test_int8_outputs_stay_close_to_fp32_on_held_out_inputs(built):
    _, fp32, int8 = built
    target = OnnxRuntimeCPU(threads=1)
    held_out = [_inputs(64, 2).numpy()]  # seed 2: not among the calibration samples (seed 1)
    expected = target.load(fp32)(held_out)[0]
    actual = target.load(int8)(held_out)[0]
    error = float(np.abs(actual - expected).max() / np.abs(expected).max())
    assert error <= INT8_ERROR_BOUND, error
    assert error > 0  # really quantized, not the fp32 graph again
    assert (actual.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_models_without_convolutions_take_dynamic_quantization_without_calibration(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(4, 64)
    artifact = OnnxRuntimeCPU(threads=1, precision="int8").build(mlp, (x,), tmp_path / "mlp.onnx")
    assert artifact.info["quantization"]["mode"] == "dynamic"
    assert artifact.info["quantization"]["calibration"] is None
    assert integer_mac_share(artifact.path, [x.numpy()]).integer_share >= MIN_INTEGER_SHARE
    assert artifact.info["max_relative_error"] < INT8_ERROR_BOUND
    lstm = onnx.helper.make_graph([onnx.helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=2)], "g",
                                  [], [])
    assert quantization_mode(onnx.helper.make_model(lstm))[0] == "dynamic"


def test_fingerprint_names_the_precision_and_the_cpu_isa():
    fp32, int8 = OnnxRuntimeCPU(threads=1).fingerprint(), OnnxRuntimeCPU(threads=1, precision="int8").fingerprint()
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert int8["isa"] == (",".join(cpu_isa_flags()) or "unknown")
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    for flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"):
        assert (flag in int8["isa"].split(",")) == (flag in flags)


@pytest.mark.parametrize("name, precision", [("torch", "int8"), ("tensorrt", "int8"), ("onnxruntime", "int4")])
def test_a_precision_a_target_cannot_run_is_one_clear_error(name, precision):
    with pytest.raises(ConfigError) as caught:
        check_precision(name, precision)
    message = str(caught.value)
    assert message.startswith(f"target {name}: precision '{precision}' is not supported (this target takes: ")
    assert "\n" not in message


def test_supported_precisions_pass_the_check():
    check_precision("onnxruntime", "int8")
    check_precision("onnxruntime", "fp32")
    check_precision("torch", "fp16")


@pytest.mark.parametrize("options, message", [
    ({"precision": "int4"}, "target onnxruntime: precision must be one of 'fp32' or 'int8', got 'int4'"),
    ({"calibration": "kl"}, "calibration must be one of"),
])
def test_bad_int8_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        get_target("onnxruntime", **options)


def test_too_few_calibration_samples_are_refused_before_any_export(tmp_path, monkeypatch):
    import spruce.targets.onnxruntime as module

    monkeypatch.setattr(module, "export_onnx", lambda *a, **k: pytest.fail("exported before checking"))
    target = OnnxRuntimeCPU(threads=1, precision="int8")
    few = [(_inputs(1, k),) for k in range(MIN_CALIBRATION_SAMPLES - 1)]
    with pytest.raises(ValueError, match=f"calibration_data has {MIN_CALIBRATION_SAMPLES - 1} samples, at least 128"):
        target.build(resnet_like(), (_inputs(1, 0),), tmp_path / "m.onnx", calibration_data=few)
    assert list(tmp_path.iterdir()) == []


def test_a_static_int8_build_without_calibration_names_it_and_leaves_nothing(tmp_path):
    target = OnnxRuntimeCPU(threads=1, precision="int8")
    with pytest.raises(ValueError, match="static quantization, which needs calibration_data"):
        target.build(resnet_like(), (_inputs(1, 0),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["model", "lone conv"])
def test_timing_at_int8_times_the_integer_graph(tmp_path, which):
    """Latency tables and budget checks time what would ship: an INT8 target's runner runs the
    quantized file (calibrated on the example: scales do not change the speed)."""
    model = resnet_like() if which == "model" else nn.Conv2d(3, 16, 3, padding=1).eval()
    example = (_inputs(2, 0),)
    runner, inputs = OnnxRuntimeCPU(threads=1, precision="int8").model_runner(model, example, tmp_path / "m")
    if which == "model":
        assert runner(inputs)[0].shape == model(example[0]).shape
    assert integer_mac_share(tmp_path / "m.int8.onnx", [example[0].numpy()]).integer_share >= MIN_INTEGER_SHARE


def test_the_int8_call_cost_is_a_lone_integer_layer_that_does_no_work(tmp_path):
    """An INT8 table subtracts the runtime's per-call cost measured on a no-work layer timed the same
    way (one QLinearConv of one channel on one pixel); fp32 tables keep the zero-channel extrapolation."""
    assert OnnxRuntimeCPU(threads=1).call_cost_case() is None
    target = OnnxRuntimeCPU(threads=1, precision="int8")
    layer, example = target.call_cost_case()
    runner, inputs = target.model_runner(layer, example, tmp_path / "m")
    assert [n.op_type for n in onnx.load(str(tmp_path / "m.int8.integer.onnx")).graph.node] == ["QLinearConv"]
    assert runner(inputs)[0].shape == (1, 1, 1, 1) and inputs[0].dtype == np.uint8


def test_a_lone_int8_layer_is_timed_as_the_whole_graph_runs_it(tmp_path):
    """Inside a whole INT8 model a convolution takes and gives uint8 NHWC tensors; alone, ONNX Runtime
    would also quantize its fp32 input, transpose it to NHWC and back and dequantize the output,
    work proportional to the activations that the whole model does not do per layer. The timed
    lone layer is the integer kernel alone, and it computes what the quantized layer computes."""
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1).eval()
    x = torch.rand(1, 8, 10, 12)
    runner, inputs = OnnxRuntimeCPU(threads=1, precision="int8").model_runner(conv, (x,), tmp_path / "m")
    assert inputs[0].dtype == np.uint8 and inputs[0].shape == (1, 10, 12, 8)
    timed = onnx.load(str(tmp_path / "m.int8.integer.onnx"))
    assert [n.op_type for n in timed.graph.node] == ["QLinearConv"]
    out = runner(inputs)[0]
    assert out.dtype == np.uint8 and out.shape == (1, 5, 6, 16)
    # the same integers as the whole quantized layer, whose boundary nodes do the rest
    import onnxruntime as ort

    whole = ort.InferenceSession(str(tmp_path / "m.int8.onnx"), providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    quantize = next(n for n in graph.node if n.input[0] == graph.input[0].name)
    dequantize = next(n for n in graph.node if n.output[0] == graph.output[0].name)
    scale_in, zero_in = (values[name] for name in quantize.input[1:3])
    real = (inputs[0].transpose(0, 3, 1, 2).astype(np.float32) - zero_in) * scale_in
    expected = whole.run(None, {whole.get_inputs()[0].name: real})[0]
    scale_out, zero_out = (values[name] for name in dequantize.input[1:3])
    got = (out.transpose(0, 3, 1, 2).astype(np.float32) - zero_out) * scale_out
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_cpu_without_a_u8s8_dot_product_keeps_7_bit_weights(built, tmp_path):
    """Without VNNI (or Arm's dot product) u8 x s8 pairs sum into int16 and can saturate: the
    weights keep 7 bits (ONNX Runtime's ``reduce_range``), and the kernels stay integer."""
    from spruce.targets.quantize import quantize_onnx

    _, fp32, _ = built
    samples = [(_inputs(1, k).numpy(),) for k in range(4)]
    plain = quantize_onnx(fp32.path, tmp_path / "avx2.onnx", samples, isa_flags=("avx2", "fma"))
    vnni = quantize_onnx(fp32.path, tmp_path / "vnni.onnx", samples, isa_flags=("avx2", "avx512_vnni"))
    assert plain.reduce_range and not vnni.reduce_range

    def largest_weight(path) -> int:
        return max(int(np.abs(onnx.numpy_helper.to_array(t)).max()) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4)

    assert largest_weight(tmp_path / "avx2.onnx") <= 64 < largest_weight(tmp_path / "vnni.onnx")
    assert integer_mac_share(tmp_path / "avx2.onnx", [samples[0][0]]).integer_share >= MIN_INTEGER_SHARE
