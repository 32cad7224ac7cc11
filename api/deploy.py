"""Deployable graphs of a compact model: ExportedProgram ``.pt2`` files and ONNX files.

A model captured whole deploys as one graph. A model captured in pieces (a detector whose
post-processing stays eager) deploys each captured piece as its own graph, called with
the inputs the compact model gives it: the glue between pieces (anchor generation, NMS,
RoI pooling) is the user's Python and stays with the user's code.

Every graph keeps a dynamic batch: the dims that differ between the example input and
the second batch size (dim 0 of every input for a model captured whole; the batch and,
for example, the number of proposals inside a detector). A model captured whole also keeps
the dims the user declared dynamic (``dynamic_shapes`` given to ``spruce.prune``; a
transformer's sequence length, an image's height and width), in the ``.pt2`` and in the
ONNX file. A piece of a model captured in pieces takes the inputs the model's eager code
gives it, not the user's: which of its dims follow a declared one is not known, so only
the dims that differ between the two batch sizes stay dynamic there.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch._ops import OpOverload
from torch.utils import _pytree as pytree

from ..capture.dynamic import bound_names, declared_by_name, with_dims
from ..capture.preserve import preserved_state, quiet
from ..passes.graph import CapturedGraph, empty_graph_like
from ..targets.base import Artifact
from ..targets.files import atomic_path

__all__ = ["Part", "check_pt2_in_fresh_process", "export_program", "parts", "save_onnx", "save_pt2"]


@dataclass
class Part:
    """One deployable graph of a compact model: ``module`` called as ``module(*args, **kwargs)``
    at the example input (``inputs``) and at the second batch size (``second``).
    ``declared``: per leaf of ``pytree.tree_leaves(inputs)``, the dims the user declared
    dynamic ({dim: torch.export Dim}, empty for a leaf without any), or None where none
    are known (a piece of a model captured in pieces)."""

    name: str
    module: nn.Module
    inputs: tuple[tuple, dict]
    second: tuple[tuple, dict] | None
    method: str = "fx"  # how it was captured: its ONNX export prefers torch.export for "export"
    declared: list[dict[int, object]] | None = None

    def declared_dims(self, inputs: tuple[tuple, dict]) -> dict[int, dict[int, object]]:
        """The declared dims of ``inputs`` (the part's example or second call) by tensor id."""
        if not self.declared:
            return {}
        return {id(leaf): dims for leaf, dims in zip(pytree.tree_leaves(inputs), self.declared)
                if isinstance(leaf, torch.Tensor) and dims}


def parts(compact: nn.Module, captured: CapturedGraph) -> list[Part]:
    """The deployable graphs of ``compact`` (the compact model of ``captured``'s model): the
    whole model, or each captured piece with the inputs the compact model gives it at the
    example input and at the second batch size (its first call)."""
    if captured.whole:
        inputs = (captured.example_inputs, captured.example_kwargs)
        return [Part("model", compact, inputs, captured.second_inputs, captured.method,
                     declared_dims(captured.root, inputs, captured.dynamic_shapes))]
    first = _piece_calls(compact, captured, (captured.example_inputs, captured.example_kwargs))
    second = _piece_calls(compact, captured, captured.second_inputs) if captured.second_inputs else {}
    return [Part(piece.path, compact.get_submodule(piece.path), first[piece.path], second.get(piece.path),
                 piece.method) for piece in captured.pieces if piece.path in first]


def declared_dims(root: nn.Module, inputs: tuple[tuple, dict], user: object) -> list[dict[int, object]] | None:
    """Per leaf of ``pytree.tree_leaves(inputs)`` (the root's example call), the dims that
    ``user`` (torch.export's ``dynamic_shapes``: a dict keyed by ``root.forward``'s argument
    names, or a tuple in argument order) declares dynamic. None without a declaration.
    Raises TypeError for a declaration of another form."""
    if user is None:
        return None
    names = bound_names(root, *inputs)
    if names is None:
        return None
    by_name = declared_by_name(user, names)
    found: dict[int, dict[int, object]] = {}

    def record(t: torch.Tensor, spec: dict) -> dict:
        found[id(t)] = dict(spec)
        return spec

    for name, value in names.items():
        with_dims(value, by_name.get(name), record)
    return [found.get(id(leaf), {}) for leaf in pytree.tree_leaves(inputs)]


def _piece_calls(model: nn.Module, captured: CapturedGraph, inputs: tuple[tuple, dict]) -> dict:
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for piece in captured.pieces:
        def pre(mod, a, k, path=piece.path):
            calls.setdefault(path, (a, dict(k)))

        handles.append(model.get_submodule(piece.path).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        model.eval()
        with torch.no_grad(), preserved_state(model):
            model(*inputs[0], **inputs[1])
    finally:
        for h in handles:
            h.remove()
    return calls


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def call_signature(module: nn.Module, args: tuple, kwargs: dict) -> inspect.Signature | None:
    """The signature a program exported from ``module`` called as ``module(*args, **kwargs)``
    is bound by: ``module.forward``'s own, or, where that takes ``*args`` / ``**kwargs`` (a
    compact model that switches graphs forwards its call), one naming each input of this
    call: a positional-only parameter per positional input (named after the parameter it
    fills, ``args_0``, ``args_1``, ... for ``*args``) and a keyword-only parameter per keyword.
    Then the shape guards torch.export records name the inputs as the saved program takes
    them (``L['input_ids']``), not as ``L['kwargs']['input_ids']``, which the program's
    guard function cannot resolve on reload. None where the call does not bind."""
    signature = inspect.signature(module.forward)
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return None
    if not any(p.kind in _VARIADIC for p in signature.parameters.values()):
        return signature
    fixed = [p for p in signature.parameters.values() if p.kind not in _VARIADIC and p.kind != p.KEYWORD_ONLY]
    star = next((p.name for p in signature.parameters.values() if p.kind == p.VAR_POSITIONAL), "args")
    names = [fixed[i].name if i < len(fixed) else f"{star}_{i - len(fixed)}" for i in range(len(args))]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs]
    return inspect.Signature(params)


def _bound(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, object] | None:
    return None if signature is None else dict(signature.bind(*args, **kwargs).arguments)


def _dynamic_shapes(part: Part) -> object:
    """Dims that differ between the part's two calls are dynamic (dim 0 without a second call),
    and the dims the user declared (with the user's ``Dim`` objects), keyed by
    :func:`call_signature`'s names."""
    args, kwargs = part.second if part.second is not None else part.inputs
    signature = call_signature(part.module, args, kwargs)
    names = _bound(signature, args, kwargs)
    if names is None:
        return None
    declared = part.declared_dims((args, kwargs))
    if part.second is None:
        def dims(t: torch.Tensor, spec: dict) -> dict:
            if t.dim():
                spec[0] = torch.export.Dim.AUTO
            spec.update(declared.get(id(t), {}))
            return spec

        return {name: with_dims(value, None, dims) for name, value in names.items()}
    try:
        ref = pytree.tree_leaves(_bound(signature, *part.inputs))
    except TypeError:  # the example call binds differently: no dim is known to vary
        ref = []
    varying = {}
    for i, leaf in enumerate(pytree.tree_leaves(names)):
        other = ref[i] if i < len(ref) else None
        if isinstance(leaf, torch.Tensor) and isinstance(other, torch.Tensor) and other.dim() == leaf.dim():
            varying[id(leaf)] = {d for d in range(leaf.dim()) if leaf.shape[d] != other.shape[d]}

    def vary(t: torch.Tensor, spec: dict) -> dict:
        for d in varying.get(id(t), ()):
            spec[d] = torch.export.Dim.AUTO
        spec.update(declared.get(id(t), {}))
        return spec

    return {name: with_dims(value, None, vary) for name, value in names.items()}


def export_program(part: Part) -> torch.export.ExportedProgram:
    """``part`` as an ExportedProgram (eval mode) with its batch dims dynamic. Sizes are
    reasoned about size-obliviously, so that a batch of one is not special: the program
    is traced at the second batch size and also runs at the example's batch of one."""
    import torch.fx.experimental._config as shape_config

    module = part.module.eval()
    args, kwargs = part.second if part.second is not None else part.inputs
    with quiet(), preserved_state(module), shape_config.patch(backed_size_oblivious=True):
        return torch.export.export(PlainOutputs(module, call_signature(module, args, kwargs)), args, kwargs or None,
                                   dynamic_shapes=_dynamic_shapes(part), strict=False)


def plain(value: object) -> object:
    """``value`` with the output classes of the model's library (a transformers
    ``ModelOutput``: a dict subclass registered with pytree) turned into plain dicts,
    tuples and lists, so a saved program loads without that library."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):  # named tuples too: a plain tuple
        return tuple(plain(v) for v in value)
    return value


class PlainOutputs(nn.Module):
    """``module`` returning :func:`plain` outputs: same parameters, and a ``forward`` with
    ``signature`` (``module.forward``'s by default; export binds inputs, dynamic shapes and
    the names in its shape guards by it)."""

    def __init__(self, module: nn.Module, signature: inspect.Signature | None = None):
        super().__init__()
        self.module = module

        def forward(*args, **kwargs):
            return plain(module(*args, **kwargs))

        forward.__signature__ = signature or inspect.signature(module.forward)
        self.forward = forward


def save_pt2(part: Part, path: str | os.PathLike) -> Path:
    """Save ``part`` as an ExportedProgram ``.pt2`` (written to a temporary file, then renamed).
    It loads with ``torch.export.load`` without the model's Python classes."""
    program = export_program(part)
    with atomic_path(path, suffix=".tmp.pt2") as temp:
        torch.export.save(program, temp)
    return Path(path)


class FlatCall(nn.Module):
    """``module`` taking the tensor leaves of its inputs as positional arguments and returning
    the tensor leaves of its output: the form an ONNX graph has."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.module = module
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def flat(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        leaves = pytree.tree_leaves((args, kwargs))
        return tuple(leaves[i] for i in self.positions)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self.constants)
        for i, t in zip(self.positions, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = self.module(*args, **kwargs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _size_calls(graph: fx.Graph, chunks: bool = True) -> fx.Graph:
    """A copy of ``graph`` reading sizes with ``Tensor.size`` instead of ATen ``sym_size``:
    TorchScript tracing (the fast ONNX exporter) keeps ``size()`` calls symbolic but turns
    the Python int ``sym_size`` returns into a constant, which would fix the batch. A
    traced size is a 0-dim tensor there, which an ATen overload's ``Scalar`` argument
    refuses: an ``arange`` over a size the graph reads (a mask built per batch row) calls
    ``torch.arange``, which records it. ``contiguous`` becomes a contiguous ``clone`` and
    every ``view`` a ``reshape`` (the same tensor wherever the view is valid): whether
    ``contiguous`` copies, and whether a later view is valid, depends on strides, and an
    exporter that re-derives strides (the torch.export-based one, after decomposing
    attention) can see other strides than the trace did and find a view invalid. With
    ``chunks``, splits that were chunks become chunks again (for TorchScript; the
    torch.export-based exporter keeps the computed split sizes symbolic, and a chunk of a
    dynamic dim makes it specialise the batch), and reshapes and expands to sizes the graph
    reads call the Tensor methods (:func:`_size_method`)."""
    new = empty_graph_like(graph)
    mapping: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, mapping)
    new.output(out)
    aten = torch.ops.aten
    for node in list(new.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.sym_size.int:
            with new.inserting_before(node):
                size = new.call_method("size", node.args)
            node.replace_all_uses_with(size)
            new.erase_node(node)
        elif node.target is aten.lift_fresh_copy.default:  # a copy of a constant: TorchScript has no symbol
            with new.inserting_before(node):
                copy_ = new.call_method("clone", node.args)
            node.replace_all_uses_with(copy_)
            new.erase_node(node)
        elif chunks and node.target is aten.split_with_sizes.default and "spruce_chunks" in node.meta:
            with new.inserting_before(node):  # sizes computed from a traced size would be frozen
                chunk = new.call_function(aten.chunk.default, (node.args[0], node.meta["spruce_chunks"], node.args[2]))
            node.replace_all_uses_with(chunk)
            new.erase_node(node)
        elif node.target in (aten._assert_tensor_metadata.default, aten._assert_scalar.default) and not node.users:
            new.erase_node(node)
        elif node.target in _ARANGES and any(isinstance(a, fx.Node) for a in node.args):
            node.target = torch.arange
        elif node.target is aten.contiguous.default and len(node.args) == 1:
            node.target = aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
        elif node.target in _VIEWS:
            _infer_computed_size(node)
            if node.target is aten.view.default:
                node.target = aten.reshape.default
            if chunks:
                _size_method(new, node, "reshape")
        elif chunks and node.target is aten.expand.default:
            _size_method(new, node, "expand")
    new.lint()
    return new


def _size_method(graph: fx.Graph, node: fx.Node, method: str) -> None:
    """Call ``Tensor.<method>`` instead of the ATen overload where ``node``'s sizes hold a size
    the graph reads: TorchScript tracing freezes the traced sizes an ATen overload's ``SymInt[]``
    argument gets into constants (the example's batch), and records those a Tensor method gets."""
    sizes = node.args[1] if len(node.args) > 1 else None
    if not isinstance(sizes, (list, tuple)) or not any(isinstance(s, fx.Node) for s in sizes):
        return
    with graph.inserting_before(node):
        call = graph.call_method(method, (node.args[0], list(sizes)))
    node.replace_all_uses_with(call)
    graph.erase_node(node)


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
_ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)


def _infer_computed_size(node: fx.Node) -> None:
    """A view whose sizes hold one the graph computes (``(b1 + b2 + 1) // 2``, the batch after
    splitting a concatenated pair, as RAFT reads it) gets -1 there: the element count fixes
    that size, and TorchScript tracing would freeze the Python arithmetic that computes it
    at the example's batch. Only where every other size is a positive literal (then -1 is
    exactly the computed size)."""
    sizes = list(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) else None
    if sizes is None:
        return
    computed = [i for i, s in enumerate(sizes) if isinstance(s, fx.Node)]
    if len(computed) != 1 or not all(isinstance(s, int) and s > 0 for i, s in enumerate(sizes) if i != computed[0]):
        return
    size = sizes[computed[0]]
    if size.op == "call_function" and size.target is torch.ops.aten.sym_size.int:
        return  # a size read straight off a tensor: TorchScript keeps it symbolic
    sizes[computed[0]] = -1
    node.args = (node.args[0], sizes, *node.args[2:])


def _traceable(module: nn.Module, chunks: bool = True) -> nn.Module:
    """``module`` in eval mode as a module the ONNX exporters export with a dynamic batch
    (``chunks``: see :func:`_size_calls`)."""
    from ..passes.export import CompactPiece, ModeSwitch

    if isinstance(module, ModeSwitch):
        module = module.eval_graph
    if isinstance(module, CompactPiece):
        gm = module.__dict__["_spruce_graphs"][0]
    elif isinstance(module, fx.GraphModule):
        gm = module
    else:
        return module
    if not any(n.op == "call_function" and isinstance(n.target, OpOverload) for n in gm.graph.nodes):
        return module
    traced = fx.GraphModule(gm, _size_calls(gm.graph, chunks), type(gm).__name__)
    return traced.eval()


def save_onnx(part: Part, path: str | os.PathLike) -> tuple[Path, float]:
    """Export ``part`` to ONNX (dynamic dim 0 on every input, and the dims the user declared
    dynamic, named after the user's ``Dim`` objects) and check it with ONNX Runtime at the example
    input and at the second batch size (the exporter also checks it at a larger batch and
    at larger declared dims: see :func:`spruce.targets.onnxruntime.export_onnx`). Returns the
    path and the largest relative difference between torch and ONNX Runtime outputs.

    The file gets its manifest (``<path>.spruce.json``, target ``onnxruntime``: the bytes
    pinned, the flattened inputs' shapes at the example), so ``spruce.bench`` can time it; a
    model captured whole is built more simply with :func:`spruce.build`."""
    from ..targets.onnxruntime import OPSET, export_onnx, external_data_files, run_onnx

    module = part.module.eval()
    flat = FlatCall(_traceable(module), *part.inputs).eval()
    for_dynamo = FlatCall(_traceable(module, chunks=False), *part.inputs).eval()
    declared = part.declared_dims(part.inputs)
    dims = [declared.get(id(t), {}) for t in flat.flat(*part.inputs)]
    path = export_onnx(flat, flat.flat(*part.inputs), path, dynamic_batch=True, dynamo_model=for_dynamo,
                       dynamic_dims=dims if any(dims) else None)
    worst = 0.0
    for inputs in [part.inputs] + ([part.second] if part.second is not None else []):
        tensors = flat.flat(*inputs)
        with torch.no_grad():
            want = flat(*tensors)
        got = run_onnx(path, tensors)
        if len(got) != len(want):
            raise ValueError(f"{path}: ONNX Runtime gives {len(got)} outputs, torch {len(want)}")
        for a, b in zip(want, got):
            b = torch.as_tensor(b)
            if a.shape != b.shape:
                raise ValueError(f"{path}: ONNX Runtime output of shape {tuple(b.shape)}, torch {tuple(a.shape)}")
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            if a.numel():
                worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    example = flat.flat(*part.inputs)
    Artifact(path=Path(path), target="onnxruntime", input_shapes=tuple(tuple(t.shape) for t in example),
             input_dtype=str(example[0].dtype).removeprefix("torch.") if example else "float32",
             info={"opset": OPSET, "dynamic_batch": True, "max_relative_error": worst, "built_by": "save_onnx"},
             data_files=external_data_files(path)).write_manifest()
    return path, worst


_LOADER = textwrap.dedent("""
    import importlib.abc, sys


    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not available to the loader")
            return None


    BLOCKED = set(sys.argv[2].split(","))
    sys.meta_path.insert(0, Blocked())
    import torch
    from torch.utils import _pytree as pytree
    for path, data in torch.load(sys.argv[1]):
        program = torch.export.load(path).module()
        worst = 0.0
        for args, kwargs, want in data:
            got = program(*args, **kwargs)
            got = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
            assert len(got) == len(want), (path, len(got), len(want))
            for a, b in zip(want, got):
                assert a.shape == b.shape, (path, a.shape, b.shape)
                if a.numel():
                    worst = max(worst, float((a.double() - b.double()).abs().max()) / max(1.0, float(a.abs().max())))
        print(worst)
""")


def check_pt2_in_fresh_process(programs: list[tuple[str | os.PathLike, Part]], timeout_s: float = 900) -> list[float]:
    """Load each ``.pt2`` in one new Python process, in which the packages of the models'
    classes (and spruce) cannot be imported, and run it at its part's example input and at
    the second batch size. Returns, per program, the largest relative difference from the
    part's outputs in this process."""
    blocked = {"spruce"}
    manifest = []
    for path, part in programs:
        blocked |= {cls.__module__.split(".")[0] for cls in type(part.module).__mro__}
        cases = []
        for inputs in [part.inputs] + ([part.second] if part.second is not None else []):
            with torch.no_grad():
                out = part.module.eval()(*inputs[0], **inputs[1])
            want = [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            cases.append((inputs[0], inputs[1], want))
        manifest.append((str(path), cases))
    blocked -= {"torch", "builtins"}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "cases.pt"
        torch.save(manifest, data)
        env = dict(os.environ, PYTHONPATH="")
        done = subprocess.run([sys.executable, "-c", _LOADER, str(data), ",".join(sorted(blocked))],
                              capture_output=True, text=True, timeout=timeout_s, cwd=folder, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"a .pt2 does not load and run in a fresh process:\n{done.stderr[-2000:]}")
    return [float(line) for line in done.stdout.strip().splitlines()[-len(programs):]]
