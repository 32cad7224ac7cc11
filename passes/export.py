"""Export passes: physically remove channels, or zero them with masks.

``remove_channels`` turns a choice of kept channels per group into a compact model
of plain torch modules (smaller weights, rewritten shape arguments) that computes
what ``mask_channels`` computes with the original architecture.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

from .analysis import ChannelAnalysis
from .graph import empty_graph_like
from .maskednorm import install_masked_norms
from .rules.meta import runs_on_meta
from .rules.registry import MODULE_FIXERS
from .spaces import SizeRead, Space, TensorDims

__all__ = ["CompactModelError", "CompactPiece", "ModeSwitch", "batch_literals", "check_runs",
           "install_graphs", "mask_channels", "remove_channels"]

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


class _Resize:
    """What an operator's size rewrite (``spruce.passes.rules.registry.REWRITES``) sees of one node."""

    def __init__(self, analysis: ChannelAnalysis, gi: int, sizes: _Sizes, old_of: dict[fx.Node, fx.Node]):
        self.values = analysis.analyzer.values
        self.extras = analysis.analyzer.extras
        self.gi, self.sizes, self.old_of = gi, sizes, old_of
        self.old: fx.Node | None = None
        self.out: object = None

    def bind(self, old: fx.Node) -> _Resize:
        self.old = old
        self.out = self.values.get((self.gi, old))
        return self

    def size(self, space: Space) -> int:
        return self.sizes.size(space)

    def changed(self, space: Space) -> bool:
        return self.sizes.changed(space)

    def value(self, arg: object) -> object:
        if not isinstance(arg, fx.Node):
            return None
        return self.values.get((self.gi, self.old_of.get(arg, arg)))

    def stale(self, arg: object) -> bool:
        return isinstance(arg, fx.Node) and _stale(self.value(arg), self.sizes)

    def extra(self, name: str) -> object:
        return self.extras.get((self.gi, self.old), {}).get(name)


def _rebuild_graph(analysis: ChannelAnalysis, gi: int, source: fx.GraphModule, root: nn.Module,
                   sizes: _Sizes) -> fx.Graph:
    """A copy of ``source``'s graph with every size-carrying argument rewritten for the kept
    channels (and ``nn.Unflatten`` modules of ``root`` given their new sizes)."""
    from .rules.registry import REWRITES

    graph = empty_graph_like(source.graph)  # the pytree input/output structure
    mapping: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(source.graph, mapping)
    graph.output(out)
    old_of = {new: old for old, new in mapping.items()}
    resize = _Resize(analysis, gi, sizes, old_of)
    for node in list(graph.nodes):
        old = old_of.get(node)
        if old is None or node.op not in ("call_function", "call_method"):
            continue
        rewrite = REWRITES.get(node.target)
        if rewrite is not None:
            rewrite(node, resize.bind(old))
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
    return graph


def _compact_graph_module(analysis: ChannelAnalysis, gi: int, source: fx.GraphModule, memo: dict,
                          sizes: _Sizes) -> fx.GraphModule:
    """``source`` with its kept channels: a deep copy sharing ``memo`` (shrunk tensors, and the
    modules and parameters other graphs of the same model already copied)."""
    targets = {n.target for n in source.graph.nodes if n.op in ("get_attr", "call_module")}
    root = {target: copy.deepcopy(_resolve_target(source, target), memo) for target in targets}
    gm = fx.GraphModule(root, _rebuild_graph(analysis, gi, source, _Targets(root), sizes), source.__class__.__name__)
    _fix_modules(source, gm)
    for attr in ("_in_spec", "_out_spec"):  # the pytree codegen's specs (graph structure, kept as is)
        if hasattr(source, attr):
            setattr(gm, attr, getattr(source, attr))
    return gm


def _resolve_target(gm: fx.GraphModule, target: str) -> object:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Targets:
    """The copied modules and tensors of a graph, looked up by their qualified name."""

    def __init__(self, objects: dict[str, object]):
        self.objects = objects

    def get_submodule(self, target: str) -> nn.Module:
        return self.objects[target]


class CompactPiece:
    """Mixed into the class of a captured piece of a compact model (a model captured in
    pieces): its forward runs its compact graph for the mode (eval, or train when the
    module's code differs in training mode); every other method of the user's class (a
    head's ``compute_loss``) stays. Pickles as the user's class plus this state."""

    def forward(self, *args, **kwargs):
        graphs = self.__dict__["_spruce_graphs"]
        graph = graphs[1] if self.training and len(graphs) > 1 else graphs[0]
        return graph(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for graph in self.__dict__["_spruce_graphs"]:
            graph._apply(fn, *args, **kwargs)  # constants and tensors the graph holds itself
        return result

    def __reduce_ex__(self, protocol):
        return _rebuild_piece, (self._spruce_base, self.__dict__)


_COMPACT_CLASSES: dict[type, type] = {}


def _compact_class(cls: type) -> type:
    if cls not in _COMPACT_CLASSES:
        _COMPACT_CLASSES[cls] = type(f"Compact{cls.__name__}", (CompactPiece, cls),
                                     {"_spruce_base": cls, "__module__": cls.__module__})
    return _COMPACT_CLASSES[cls]


def _rebuild_piece(cls: type, state: dict) -> nn.Module:
    obj = _compact_class(cls).__new__(_compact_class(cls))
    obj.__dict__.update(state)
    return obj


def install_graphs(module: nn.Module, graphs: list[fx.GraphModule]) -> None:
    """Make ``module`` run ``graphs`` (eval, and train when given) as its forward. The graphs
    reach ``module``'s own submodules (so ``.train()`` and buffer updates act on what the
    module holds); tensors the graphs hold themselves follow ``.to()``."""
    for gm in graphs:
        for name, child in module.named_children():
            if name in gm._modules:
                gm._modules[name] = child
    module.__dict__["_spruce_graphs"] = tuple(graphs)
    if not isinstance(module, CompactPiece):
        module.__class__ = _compact_class(type(module))


def remove_channels(analysis: ChannelAnalysis, model: nn.Module, kept: Kept) -> nn.Module:
    """A compact copy of ``model`` keeping ``kept[group.id]`` channels of each group.

    Invariant: on any input the compact model computes what
    ``mask_channels(analysis, model, kept)`` computes. ``model`` is not modified.
    A model captured whole becomes a GraphModule, or a :class:`ModeSwitch` of two when its
    code differs in training mode. A model captured in pieces stays a copy of the user's
    model (its eager code, its methods) whose captured pieces run their compact graphs."""
    sizes = _Sizes(analysis.alive_mask(kept))
    shrunk = _shrunk_tensors(analysis, sizes, model)
    memo = dict(shrunk)  # deepcopy takes the shrunk tensors instead of copying the originals
    captured = analysis.captured
    if captured.whole:
        piece = captured.pieces[0]
        graphs = [_compact_graph_module(analysis, gi, gm, memo, sizes) for gi, gm in enumerate(piece.graphs)]
        result: nn.Module = graphs[0] if len(graphs) == 1 else ModeSwitch(graphs[0], graphs[1])
        return result.train(model.training)
    new_model = copy.deepcopy(model, memo)
    _fix_modules(model, new_model)
    gi = 0
    for piece in captured.pieces:
        graphs = []
        for gm in piece.graphs:
            graphs.append(_compact_graph_module(analysis, gi, gm, memo, sizes))
            gi += 1
        install_graphs(new_model.get_submodule(piece.path), graphs)
    return new_model.train(model.training)


_SIZE_LIST_OPS = {"view", "reshape", "expand", torch.reshape, torch.ops.aten.view.default,
                  torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default, torch.ops.aten.expand.default}


def batch_literals(analysis: ChannelAnalysis, batch: int) -> list[str]:
    """Nodes of a model captured whole that write the example's batch size into a size
    argument as a literal (``x.reshape(2, -1)``): such a graph runs at no other batch
    size. Read from the analysis alone (no run): a literal whose dim carries the elements
    of an input's batch dim."""
    an = analysis.analyzer
    labels = analysis.labels
    found: list[str] = []
    for gi, gm in enumerate(analysis.captured.graphs):
        batch_labels: set[int] = set()
        for node in gm.graph.nodes:
            value = an.values.get((gi, node)) if node.op == "placeholder" else None
            for dims in _tensor_dims(value):
                if dims and dims[0].size == batch:
                    batch_labels.update(labels[dims[0].start : dims[0].start + dims[0].size].tolist())
        for node in gm.graph.nodes:
            if node.op not in ("call_method", "call_function") or node.target not in _SIZE_LIST_OPS:
                continue
            out = an.values.get((gi, node))
            source = an.values.get((gi, node.args[0])) if isinstance(node.args[0], fx.Node) else None
            sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if not isinstance(out, TensorDims) or not isinstance(source, TensorDims) or len(sizes) != len(out):
                continue
            for arg, space in zip(sizes, out):
                # the literal sizes a dim the input carries through (not a new size-1 axis that
                # broadcasting happens to align with a batch of one)
                if (isinstance(arg, int) and arg == batch and any(space is s for s in source)
                        and batch_labels.intersection(labels[space.start : space.start + space.size].tolist())):
                    found.append(node.name)
    return found


def _tensor_dims(value: object) -> list[TensorDims]:
    if isinstance(value, TensorDims):
        return [value]
    if isinstance(value, (tuple, list)):
        return [d for v in value for d in _tensor_dims(v)]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _tensor_dims(v)]
    return []


def mask_channels(analysis: ChannelAnalysis, model: nn.Module, kept: Kept) -> nn.Module:
    """A copy of ``model`` (same architecture) whose parameters and buffers are zero on every
    removed channel (a zeroed BatchNorm channel outputs zero whatever its statistics; a
    fixed filter or projection held in a buffer must not carry a removed channel). A
    LayerNorm / RMSNorm whose normalised width shrinks (``normalised_widths``) computes its
    statistics over the kept channels (:mod:`spruce.passes.maskednorm`)."""
    sizes = _Sizes(analysis.alive_mask(kept))
    masked = copy.deepcopy(model)
    new_params = dict(masked.named_parameters(remove_duplicate=False))
    new_params.update(masked.named_buffers(remove_duplicate=False))
    done: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in named:
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
    return install_masked_norms(masked, analysis.norm_keeps(kept), analysis.hand_written_norms())


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


def _runs(model: nn.Module, inputs: tuple, mode: str, kwargs: dict | None = None
          ) -> tuple[BaseException, fx.Node | None] | None:
    """Run ``model`` once in ``mode``; None when it runs, else the error and the failing node.
    Graphs run node by node (which also spares the user fx's printed traceback); a call with
    keyword arguments goes through the model's own forward."""
    model.train(mode == "train")
    graph = None if kwargs else _graph_in_mode(model, mode)
    if graph is None:
        try:
            model(*inputs, **(kwargs or {}))
        except Exception as exc:  # noqa: BLE001 - any failure of the model is reported by the caller
            return exc, None
        return None
    graph.train(mode == "train")
    if runs_on_meta(graph, inputs):
        return None
    locating = _Locating(graph)
    try:
        locating.run(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the model is reported by the caller
        return exc, locating.node
    return None


def check_runs(compact: nn.Module, example_inputs: tuple, reference: nn.Module, what: str = "compact model",
               example_kwargs: dict | None = None) -> None:
    """Run ``compact`` once on ``example_inputs`` (positional arguments, plus keyword arguments
    ``example_kwargs``), in eval mode and,
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
                failure = _runs(compact, inputs, mode, example_kwargs)
                if failure is None or _runs(reference, inputs, mode, example_kwargs) is not None:
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
