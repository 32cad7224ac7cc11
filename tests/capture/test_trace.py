import pytest
import spruce
import torch
from helpers import channel_groups
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: untraceable
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.block = nn.Sequential(nn.ReLU(), DataDependent())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_every_tensor_node_has_shape_and_dtype():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    gm = spruce.trace(model, torch.randn(2, 3, 8, 8))
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        meta = node.meta["tensor_meta"]
        assert isinstance(meta, TensorMetadata)
        assert meta.dtype == torch.float32
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"}
    assert shapes["_3"] == (2, 288)
    assert shapes["_4"] == (2, 5)


def test_untraceable_model_names_module_and_operation():
    with pytest.raises(spruce.TraceError) as info:
        spruce.trace(Net(), torch.randn(1, 3, 8, 8))
    err = info.value
    assert err.module_path == "block.1"
    assert "block.1" in str(err) and "leaf_modules" in str(err)
    assert "control flow" in str(err)
    assert "x.sum() > 0" in str(err)  # the user's line


def test_leaf_modules_make_it_traceable_and_pin_its_channels():
    model = Net()
    gm = spruce.trace(model, torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    assert any(n.op == "call_module" and n.target == "block.1" for n in gm.graph.nodes)
    groups = channel_groups(model, torch.randn(1, 3, 8, 8), leaf_modules=["block.1"])
    conv_out = next(g for g in groups if any(m.name == "conv.weight" and m.dim == 0 for m in g.members))
    assert not conv_out.prunable
    assert "block_1" in conv_out.reason and "unknown operator" in conv_out.reason


def test_wrong_input_shape_names_the_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with pytest.raises(spruce.TraceError) as info:
        spruce.trace(model, torch.randn(1, 4, 8, 8))
    assert "'_0'" in str(info.value)


def test_trace_leaves_model_state_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    channel_groups(model, x)
    assert torch.rand(1) == expected
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
