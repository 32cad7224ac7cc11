"""The graph contract every pass takes: a model captured at its example input.

Only ``spruce.compiler`` captures models (``spruce.capture.capture``); passes
(analysis, masking, channel removal, latency profiling) receive a
:class:`CapturedGraph` and never trace anything themselves.

A captured model is one or more :class:`Piece`\\ s. Most models are one piece, the
root module, captured whole: by plain ``torch.fx`` symbolic tracing (the fast path,
whose graph calls the user's modules) or, where that fails, by ``torch.export``
(non-strict, whose graph calls ATen operators on the user's parameters). A model
whose forward cannot be captured whole because it filters by data (detection
post-processing: NMS, top-k, thresholds, anchor matching, losses) is captured as the
largest submodules that can be; its remaining code (the *glue*) stays eager Python.

What a pass may rely on:

- Every graph is a ``torch.fx.GraphModule`` whose every tensor-valued node carries
  ``meta["tensor_meta"]`` (shape, dtype) at the example input, and which reads the
  parameters and buffers of ``root`` (the same tensor objects; ``get_attr`` targets and
  ``call_module`` targets are qualified names relative to the piece's module, and the
  piece's module is ``root.get_submodule(piece.path)``).
- An fx graph holds ``call_module`` / ``call_function`` (torch, ``torch.nn.functional``,
  ``operator``) / ``call_method`` nodes; an export graph holds ``call_function`` nodes
  on ``torch.ops.aten`` (and registered custom ops such as ``torchvision::roi_align``),
  ``operator.getitem`` and ``SymInt`` arithmetic (``aten.sym_size.int``, ``operator.mul``),
  with the input/output structure (tuples, lists, dicts, keyword arguments) kept by a
  ``torch.fx`` pytree codegen, so it is called like the module it replaces.
- The batch dimension (dim 0 of every input tensor) is dynamic in every graph, other
  dims where the user declared them; no graph bakes in the example's batch size.
- ``eval`` runs in eval mode; ``train`` is the training-mode graph when the module's
  code differs in training mode (BatchNorm statistics, dropout, auxiliary heads), else
  None. Both read the same tensors.
- Between pieces, a :class:`Link` says that an output leaf of one piece is passed, as
  the very same tensor object and through no other code, as an input leaf of another:
  such values keep their channels coupled across pieces. Every other input and output
  of a piece crosses eager code and keeps all its channels (``Piece.pinned_outputs``
  says why, per output leaf).

Leaves are numbered in one order everywhere: the tensors of a node value flattened
depth first (tuples and lists in order, dicts in insertion order), over the graph's
placeholders in order for inputs and over the output node's argument for outputs
(:func:`tensor_leaves`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

__all__ = ["CapturedGraph", "Link", "Piece", "as_input_tuple", "empty_graph_like", "has_pytree_io", "require_data",
           "split_inputs", "tensor_leaves"]


@dataclass(frozen=True)
class Link:
    """Output leaf ``out_leaf`` of piece ``src`` is input leaf ``in_leaf`` of piece ``dst``
    (the same tensor object, passed through no other code)."""

    src: int
    out_leaf: int
    dst: int
    in_leaf: int


@dataclass
class Piece:
    """One captured module: ``root.get_submodule(path)`` ("" is the root itself).

    ``method`` is "fx" or "export". ``args`` / ``kwargs`` are its recorded call at the
    example input (for the root: the example inputs). ``pinned_outputs`` maps an output
    leaf to the reason it must keep its channels (it reaches eager code or the model's
    output) and the dims concerned (None: all); leaves absent from it only feed other
    pieces through :class:`Link`\\ s. ``pinned_inputs`` maps an input leaf that eager code
    computes (in some call) to the reason; an input leaf keeps its channels unless it is
    linked and absent from it. The root piece of a model captured whole has every
    output pinned by the analysis itself (a graph output)."""

    path: str
    eval: fx.GraphModule
    train: fx.GraphModule | None
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    pinned_outputs: dict[int, tuple[str, tuple[int, ...] | None]] = field(default_factory=dict)
    pinned_inputs: dict[int, str] = field(default_factory=dict)

    @property
    def graphs(self) -> list[fx.GraphModule]:
        return [self.eval] if self.train is None else [self.eval, self.train]

    def graph_for(self, training: bool) -> fx.GraphModule:
        """The graph that runs in the given mode."""
        return self.train if training and self.train is not None else self.eval


def require_data(model: nn.Module, example_inputs: object, what: str) -> None:
    """Raise ``ValueError`` when ``model``'s parameters or buffers, or the example inputs, are on
    the ``meta`` device: they have shapes but no values, so ``what`` (an operation that reads
    weights or runs the model) cannot work on them. The message names the first such tensors and
    how to materialise them. Tracing and channel analysis work on meta models and need no check."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    empty = [name for name, tensor in named if tensor.is_meta]
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    empty += [f"example input {i}" for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_meta]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ValueError(f"{what}: {shown} {'is' if len(empty) == 1 else 'are'} on the meta device (shapes "
                         "without values): materialise the model first, e.g. model.to_empty(device='cpu') then "
                         "model.load_state_dict(weights), and give example inputs with values")


@dataclass
class CapturedGraph:
    """A model captured at its example input, as one or more :class:`Piece`\\ s.

    ``example_inputs`` / ``example_kwargs`` are the inputs the model was captured with;
    ``second_inputs`` (args, kwargs) the same inputs at another batch size, at which
    the capture was checked and at which compact models are checked. ``notes`` say, in
    words, which code stays eager and why (empty when the root is captured whole).
    ``dynamic_shapes`` is the user's declaration of dynamic dims other than the batch
    (torch.export's format, keyed by the root's ``forward`` arguments), which the
    deployed graphs keep (:mod:`spruce.api.deploy`)."""

    pieces: list[Piece]
    root: nn.Module
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    second_inputs: tuple[tuple, dict] | None = None
    notes: list[str] = field(default_factory=list)
    dynamic_shapes: object = None

    @property
    def whole(self) -> bool:
        """Is the model one piece, its root?"""
        return len(self.pieces) == 1 and self.pieces[0].path == ""

    @property
    def method(self) -> str:
        """How the root was captured: "fx", "export", or "pieces"."""
        return self.pieces[0].method if self.whole else "pieces"

    @property
    def eval(self) -> fx.GraphModule:
        """The eval-mode graph of a model captured whole."""
        return self._root_piece().eval

    @property
    def train(self) -> fx.GraphModule | None:
        return self._root_piece().train

    @property
    def graphs(self) -> list[fx.GraphModule]:
        """Every graph of every piece, in piece order (eval before train)."""
        return [gm for piece in self.pieces for gm in piece.graphs]

    def graph_for(self, training: bool) -> fx.GraphModule:
        """The graph of a model captured whole that runs in the given mode."""
        return self._root_piece().graph_for(training)

    def _root_piece(self) -> Piece:
        if not self.whole:
            paths = ", ".join(repr(p.path) for p in self.pieces)
            raise ValueError(f"the model was captured in pieces ({paths}), not as one graph: "
                             + "; ".join(self.notes))
        return self.pieces[0]


def as_input_tuple(example_inputs: object) -> tuple:
    """Normalise example inputs to a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def split_inputs(example_inputs: object) -> tuple[tuple, dict]:
    """Example inputs as ``(args, kwargs)``: a tensor is the one positional argument, a
    tuple or list the positional arguments (a model taking a list, like torchvision's
    detectors, is given ``([image, ...],)``), a dict the keyword arguments."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return as_input_tuple(example_inputs), {}


def tensor_leaves(value: object) -> Iterator[object]:
    """The leaves of ``value`` that are not containers, depth first (tuples and lists in
    order, dicts in insertion order); the leaf order of the graph contract."""
    if isinstance(value, (tuple, list)) and not _is_leaf_tuple(value):
        for v in value:
            yield from tensor_leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensor_leaves(v)
    else:
        yield value


def _is_leaf_tuple(value: object) -> bool:
    # torch.Size and fx's TensorMetadata are tuples that stand for one value
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(value, (torch.Size, TensorMetadata))


def has_pytree_io(graph: fx.Graph) -> bool:
    """Whether ``graph`` takes and returns pytrees (an export graph: its placeholders are the
    flattened input leaves and its output is unflattened into the module's structure)."""
    return isinstance(graph._codegen, fx.graph._PyTreeCodeGen)


def empty_graph_like(graph: fx.Graph) -> fx.Graph:
    """A new, empty graph with ``graph``'s input/output structure (its pytree codegen), for a
    rewritten copy of ``graph`` to be built in."""
    new = fx.Graph()
    new._codegen = copy.copy(graph._codegen)  # the specs are shared, never mutated
    return new
