"""Export passes: physically remove channels, or zero them with masks.

``remove_channels`` turns a choice of kept channels per group into a compact model
of plain torch modules (smaller weights, rewritten shape arguments) that computes
what ``mask_channels`` computes with the original architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import fx, nn

from .analysis import ChannelAnalysis, SizeRead, Space, TensorDims

__all__ = ["MODULE_FIXERS", "CompactModelError", "ModeSwitch", "check_runs", "mask_channels", "remove_channels"]

Kept = dict[int, np.ndarray]


class ModeSwitch(nn.Module):
    """A compact model whose training-mode graph differs from its eval-mode graph
    (auxiliary heads): runs ``train_graph`` in training mode, ``eval_graph`` otherwise.
    Both graphs share the same submodules and parameters."""

    def __init__(self, eval_graph: fx.GraphModule, train_graph: fx.GraphModule):
        super().__init__()
        self.eval_graph = eval_graph
        self.train_graph = train_graph

    def forward(self, *args, **kwargs):
        graph = self.train_graph if self.training else self.eval_graph
        return graph(*args, **kwargs)


class _Sizes:
    """New sizes of spaces once dead elements are gone."""

    def __init__(self, alive: np.ndarray):
        self.alive = alive

    def keep(self, space: Space) -> np.ndarray:
        return np.flatnonzero(self.alive[space.start : space.start + space.size])

    def size(self, space: Space) -> int:
        return int(self.alive[space.start : space.start + space.size].sum())

    def changed(self, space: Space) -> bool:
        return self.size(space) != space.size


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )


def _dead_entries(analysis: ChannelAnalysis, sizes: _Sizes, tensor: torch.Tensor):
    """(dim, kept indices) for each dim of ``tensor`` that loses entries."""
    out = []
    for d in range(tensor.dim()):
        space = analysis.analyzer.param_spaces.get((id(tensor), d))
        if space is not None and sizes.changed(space):
            out.append((d, sizes.keep(space)))
    return out


def _constants(analysis: ChannelAnalysis, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensor attributes read by get_attr that are neither parameters nor buffers."""
    registered = {id(t) for _, t in _named_tensors(model)}
    out = []
    for key, tensor in analysis.analyzer.tensors.items():
        if key not in registered:
            out.append((analysis.analyzer.tensor_names[key], tensor))
    return out


def _shrunk_tensors(analysis: ChannelAnalysis, sizes: _Sizes, model: nn.Module) -> dict[int, torch.Tensor]:
    """New (smaller) tensors for every parameter/buffer/constant that loses entries,
    keyed by the id of the original tensor (tied tensors stay tied)."""
    shrunk: dict[int, torch.Tensor] = {}
    for _, tensor in _named_tensors(model) + _constants(analysis, model):
        if id(tensor) in shrunk:
            continue
        cuts = _dead_entries(analysis, sizes, tensor)
        if not cuts:
            continue
        data = tensor.detach()
        for d, keep in cuts:
            data = data.index_select(d, torch.as_tensor(keep, device=data.device))
        if isinstance(tensor, nn.Parameter):
            data = nn.Parameter(data, requires_grad=tensor.requires_grad)
        shrunk[id(tensor)] = data
    return shrunk


# ---- module attributes after their tensors shrank -----------------------------

ModuleFixer = Callable[[nn.Module, nn.Module], None]
MODULE_FIXERS: dict[type, ModuleFixer] = {}


def module_fixer(*types: type):
    def register(fn: ModuleFixer) -> ModuleFixer:
        for t in types:
            MODULE_FIXERS[t] = fn
        return fn

    return register


@module_fixer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _fix_conv(new: nn.Module, old: nn.Module) -> None:
    in_per_group = old.in_channels // old.groups
    out_per_group = old.out_channels // old.groups
    new.out_channels = new.weight.shape[0]
    if in_per_group == 1 and old.groups > 1:  # depthwise: the group count follows the channels
        new.groups = new.out_channels // out_per_group
    new.in_channels = new.weight.shape[1] * new.groups


@module_fixer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _fix_conv_transpose(new: nn.Module, old: nn.Module) -> None:
    in_per_group = old.in_channels // old.groups
    new.in_channels = new.weight.shape[0]
    if in_per_group == 1 and old.groups > 1:
        new.groups = new.in_channels
    new.out_channels = new.weight.shape[1] * new.groups


@module_fixer(nn.Linear)
def _fix_linear(new: nn.Module, old: nn.Module) -> None:
    new.out_features, new.in_features = new.weight.shape


@module_fixer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _fix_norm(new: nn.Module, old: nn.Module) -> None:
    for t in (new.weight, new.running_mean):
        if t is not None:
            new.num_features = t.shape[0]
            return


@module_fixer(nn.Embedding)
def _fix_embedding(new: nn.Module, old: nn.Module) -> None:
    new.embedding_dim = new.weight.shape[1]


@module_fixer(nn.PReLU)
def _fix_prelu(new: nn.Module, old: nn.Module) -> None:
    new.num_parameters = new.weight.shape[0]


@module_fixer(nn.MultiheadAttention)
def _fix_mha(new: nn.Module, old: nn.Module) -> None:
    embed = new.in_proj_weight.shape[1]
    new.embed_dim = new.kdim = new.vdim = embed
    new.num_heads = embed // old.head_dim
    new.out_proj.in_features = new.out_proj.out_features = embed


def _fix_modules(old: nn.Module, new: nn.Module) -> None:
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for name, module in old.named_modules(remove_duplicate=False):
        for t in type(module).__mro__:
            if t in MODULE_FIXERS:
                MODULE_FIXERS[t](new_modules[name], module)
                break


# ---- graph arguments that carry sizes -----------------------------------------


def _stale(value: object, sizes: _Sizes) -> bool:
    return isinstance(value, SizeRead) and any(sizes.changed(s) for s in value.spaces)


def _shape_args(node: fx.Node) -> tuple[list, Callable[[list], None]] | None:
    """The size arguments of a reshape-like node and a setter for new ones."""
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0]), lambda new: setattr(node, "args", (node.args[0], tuple(new)))
        if "size" in node.kwargs or "shape" in node.kwargs:
            key = "size" if "size" in node.kwargs else "shape"
            return list(node.kwargs[key]), lambda new: node.update_kwarg(key, tuple(new))
        return rest, lambda new: setattr(node, "args", (node.args[0], *new))
    if node.op == "call_function" and node.target is torch.reshape:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]
        return list(shape), lambda new: setattr(node, "args", (node.args[0], tuple(new)))
    return None


def _rewrite_shape(node: fx.Node, old: fx.Node, analysis: ChannelAnalysis, gi: int, sizes: _Sizes,
                   old_of: dict[fx.Node, fx.Node]) -> None:
    found = _shape_args(node)
    if found is None:
        return
    args, setter = found
    out = analysis.analyzer.values.get((gi, old))
    if not isinstance(out, TensorDims) or len(out) != len(args):
        return
    values = analysis.analyzer.values
    changed = False
    new_args = []
    for arg, space in zip(args, out):
        stale = isinstance(arg, fx.Node) and _stale(values.get((gi, old_of.get(arg, arg))), sizes)
        if isinstance(arg, int) and arg == -1:
            new_args.append(arg)
        elif sizes.changed(space) or stale:
            new_args.append(sizes.size(space))
            changed = True
        else:
            new_args.append(arg)
    if changed:
        setter(new_args)


def _rewrite_split(node: fx.Node, old: fx.Node, analysis: ChannelAnalysis, gi: int, sizes: _Sizes) -> None:
    is_split = node.op in ("call_method", "call_function") and getattr(
        node.target, "__name__", node.target
    ) in ("split", "chunk", "split_with_sizes")
    if not is_split:
        return
    outs = analysis.analyzer.values.get((gi, old))
    if not isinstance(outs, tuple) or not outs:
        return
    x = analysis.analyzer.values.get((gi, old.args[0])) if isinstance(old.args[0], fx.Node) else None
    if not isinstance(x, TensorDims):
        return
    dims = [d for d in range(len(x)) if outs[0][d] is not x[d]]
    if not dims:
        return
    d = dims[0]
    if not any(sizes.changed(o[d]) for o in outs):
        return
    new_sizes = [sizes.size(o[d]) for o in outs]
    node.args = (node.args[0], new_sizes, d)
    node.kwargs = {}
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split


def _rebuild_graph(analysis: ChannelAnalysis, gi: int, source: fx.GraphModule, root: nn.Module,
                   sizes: _Sizes) -> fx.GraphModule:
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(source.graph, mapping)
    graph.output(out)
    old_of = {new: old for old, new in mapping.items()}
    for node in graph.nodes:
        old = old_of.get(node)
        if old is None:
            continue
        _rewrite_shape(node, old, analysis, gi, sizes, old_of)
        _rewrite_split(node, old, analysis, gi, sizes)
    for node in graph.nodes:
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            if isinstance(module, nn.Unflatten):
                value = analysis.analyzer.values.get((gi, old_of[node]))
                if isinstance(value, TensorDims):
                    d = module.dim if module.dim >= 0 else len(value) - len(module.unflattened_size) + 1 + module.dim
                    module.unflattened_size = tuple(
                        sizes.size(s) for s in value[d : d + len(module.unflattened_size)]
                    )
    graph.lint()
    gm = fx.GraphModule(root, graph, source.__class__.__name__)
    gm.recompile()
    return gm


def remove_channels(analysis: ChannelAnalysis, model: nn.Module, kept: Kept) -> nn.Module:
    """A compact copy of ``model`` keeping ``kept[group.id]`` channels of each group.

    Invariant: on any input the compact model computes what
    ``mask_channels(analysis, model, kept)`` computes. ``model`` is not modified.
    Returns a GraphModule, or a :class:`ModeSwitch` of two when the model's code
    differs in training mode."""
    sizes = _Sizes(analysis.alive_mask(kept))
    shrunk = _shrunk_tensors(analysis, sizes, model)
    # deepcopy takes the shrunk tensors from the memo instead of copying the originals
    new_model = copy.deepcopy(model, memo=dict(shrunk))
    _fix_modules(model, new_model)
    graphs = [_rebuild_graph(analysis, gi, gm, new_model, sizes) for gi, gm in enumerate(analysis.captured.graphs)]
    if len(graphs) == 1:
        result: nn.Module = graphs[0]
    else:
        result = ModeSwitch(graphs[0], graphs[1])
    return result.train(model.training)


def mask_channels(analysis: ChannelAnalysis, model: nn.Module, kept: Kept) -> nn.Module:
    """A copy of ``model`` (same architecture) whose parameters are zero on every
    removed channel. Buffers (running statistics) are left as they are."""
    sizes = _Sizes(analysis.alive_mask(kept))
    masked = copy.deepcopy(model)
    new_params = dict(masked.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    with torch.no_grad():
        for name, tensor in model.named_parameters(remove_duplicate=False):
            if id(tensor) in done:
                continue
            done.add(id(tensor))
            target = new_params[name]
            for d in range(tensor.dim()):
                space = analysis.analyzer.param_spaces.get((id(tensor), d))
                if space is None or not sizes.changed(space):
                    continue
                dead = np.flatnonzero(~sizes.alive[space.start : space.start + space.size])
                target.index_fill_(d, torch.as_tensor(dead, device=target.device), 0.0)
    return masked


# ---- the compact model must run ---------------------------------------------------------


class CompactModelError(ValueError):
    """A compact model fails on the example input its source model runs on (a limitation
    of the channel analysis for this model, with a remedy: keep those channels). ``node`` is
    the name of the graph node that failed (None outside an fx graph), ``mode`` is
    ``"eval"`` or ``"train"``."""

    def __init__(self, message: str, node: str | None = None, mode: str = "eval"):
        super().__init__(message)
        self.node = node
        self.mode = mode


class _Locating(fx.Interpreter):
    """Runs a graph node by node, remembering the node being run."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.node = n
        return super().run_node(n)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = getattr(node.target, "__name__", str(node.target))
    args = ", ".join(f"{k}={v!r}" for k, v in node.kwargs.items() if not isinstance(v, fx.Node))
    return f"function {target}({args})" if args else f"function {target}"


def _graph_in_mode(model: nn.Module, mode: str) -> fx.GraphModule | None:
    if isinstance(model, ModeSwitch):
        return model.train_graph if mode == "train" else model.eval_graph
    return model if isinstance(model, fx.GraphModule) else None


def _on_device(inputs: tuple, model: nn.Module) -> tuple:
    first = next(iter(model.parameters()), None)
    if first is None:
        return inputs
    return tuple(x.to(first.device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _runs(model: nn.Module, inputs: tuple, mode: str) -> tuple[BaseException, fx.Node | None] | None:
    """Run ``model`` once in ``mode``; None when it runs, else the error and the failing node.
    Graphs run node by node (which also spares the user fx's printed traceback)."""
    model.train(mode == "train")
    graph = _graph_in_mode(model, mode)
    if graph is None:
        try:
            model(*inputs)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is reported by the caller
            return exc, None
        return None
    graph.train(mode == "train")
    locating = _Locating(graph)
    try:
        locating.run(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the model is reported by the caller
        return exc, locating.node
    return None


def check_runs(compact: nn.Module, example_inputs: tuple, reference: nn.Module, what: str = "compact model") -> None:
    """Run ``compact`` once on ``example_inputs`` (positional arguments), in eval mode and,
    for a :class:`ModeSwitch`, in training mode too; wherever ``reference`` (the model it was
    made from) runs on the same input, ``compact`` must run as well.

    Nothing changes: no gradient is recorded, both models keep their mode, buffers
    (BatchNorm statistics) and the global RNG state. Raises :class:`CompactModelError`
    naming the failing node and the error it raised."""
    inputs = _on_device(tuple(example_inputs), compact)
    modes = ["eval", "train"] if isinstance(compact, ModeSwitch) else ["eval"]
    models = (compact, reference)
    # modes per submodule: a SparseModel in eval mode shares its layers with a source whose root
    # still says training, and ``source.train(flag)`` would overwrite them all
    saved = [([(sub, sub.training) for sub in m.modules()], {k: b.detach().clone() for k, b in m.named_buffers()})
             for m in models]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for mode in modes:
                failure = _runs(compact, inputs, mode)
                if failure is None or _runs(reference, inputs, mode) is not None:
                    continue  # runs, or the input does not fit the reference either: nothing to blame
                exc, node = failure
                where = f"node '{node.name}' ({_describe(node)})" if node is not None else "its forward"
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise CompactModelError(
                    f"the {what} cannot run on the example input in {mode} mode: {where} raised "
                    f"{type(exc).__name__}: {message}. Channels were removed that this operation still "
                    "counts on (a channel count written as a literal in the model's code, such as groups=, is "
                    "the usual cause); keep them with ignore=[...] (prune) or exclude=[...] (sparsify)",
                    node=None if node is None else node.name, mode=mode) from exc
    finally:
        with torch.no_grad():
            for model, (modes, buffers) in zip(models, saved):
                for sub, training in modes:
                    sub.training = training
                for key, buffer in model.named_buffers():
                    if key in buffers:
                        buffer.copy_(buffers[key])
