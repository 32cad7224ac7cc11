"""Keyword inputs that the user's ``forward`` makes optional stay optional in an exported graph.

torch.export's graph takes exactly the inputs of the example. Its code generator is replaced by
one whose ``forward`` gives a ``None`` default to every input the user's ``forward`` gives a
default to, and says what happens without it:

- an input the model was not captured with (absent, or ``None`` in the example, positional or
  keyword) may be left out or passed as ``None``; passed as a tensor, it raises ``TypeError``
  (the graph was computed without it);
- an input the model was captured with is filled with its neutral value where one is known
  (a transformers model's ``attention_mask``: ones shaped like ``input_ids``, see
  :data:`spruce.capture.transformers.NEUTRAL_INPUTS`), else its absence raises ``TypeError``
  naming it (the graph computes with it).
"""

from __future__ import annotations

import inspect

from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen

from .transformers import NEUTRAL_INPUTS, is_transformers_model

__all__ = ["OptionalInputs", "keep_optional_inputs"]


class OptionalInputs(_PyTreeCodeGen):
    """A pytree code generator whose ``forward`` has ``None`` defaults: ``fills`` maps a
    captured input to the expression computing it when it is left out (``None``: a
    ``TypeError``), ``absent`` lists the inputs the graph does not take (accepted as ``None``)."""

    def __init__(self, pytree_info, fills: dict[str, str | None], absent: tuple[str, ...]):
        super().__init__(pytree_info)
        self.fills = fills
        self.absent = absent

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def: bool = False) -> str:
        text = super().gen_fn_def(free_vars, maybe_return_annotation, expanded_def=expanded_def)
        header, newline, body = text.partition("\n")
        names = [n for n in self.pytree_info.orig_args if n != "self"]
        if expanded_def or not header.startswith(f"def {self._func_name}(") or not names:
            return text
        # a default only where every later argument has one too (Python's rule)
        trailing = len(names)
        while trailing > 0 and names[trailing - 1] in self.fills:
            trailing -= 1
        params = ["self"] + [f"{n}=None" if i >= trailing else n for i, n in enumerate(names)]
        params += [f"{n}=None" for n in self.absent]
        lines = [f"def {self._func_name}({', '.join(params)}){maybe_return_annotation}:"]
        for name in names[trailing:]:
            fill = self.fills[name]
            action = (f"{name} = {fill}" if fill is not None else
                      f"raise TypeError({self._missing(name)!r})")
            lines += [f"    if {name} is None:", f"        {action}"]
        for name in self.absent:
            message = (f"the compact model was captured without {name!r}: its graph does not read it; "
                       f"capture (prune) the model with {name!r} in the example inputs to use it")
            # not while fx re-traces the code (a pickled graph module is rebuilt that way)
            lines += [f"    if {name} is not None and not isinstance({name}, torch.fx.Proxy):",
                      f"        raise TypeError({message!r})"]
        return "\n".join(lines) + newline + body

    @staticmethod
    def _missing(name: str) -> str:
        return (f"the compact model was captured with {name!r} and its graph computes with it: pass {name}= "
                "(or capture the model without it)")


def keep_optional_inputs(gm: fx.GraphModule, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give ``gm`` (``module`` exported at ``args`` / ``kwargs``) an :class:`OptionalInputs`
    code generator where ``module.forward`` has arguments with defaults; recompiles ``gm``."""
    codegen = gm.graph._codegen
    if type(codegen) is not _PyTreeCodeGen or codegen.pytree_info is None:
        return
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    optional = {n for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty
                and p.kind in kinds}
    names = [n for n in codegen.pytree_info.orig_args if n != "self"]
    if not optional or any(n not in signature.parameters for n in names):
        return
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    neutral = NEUTRAL_INPUTS if is_transformers_model(module) else {}
    fills: dict[str, str | None] = {}
    for name in names:
        if name not in optional:
            continue
        rule = neutral.get(name)
        like = rule[0] if rule is not None else None
        value = placeholders.get(name).meta.get("val") if name in placeholders else None
        if rule is not None and like in names and bound.get(like) is not None and value is not None:
            fills[name] = rule[1].format(like=like, dtype=str(value.dtype))
        else:
            fills[name] = None
    absent = tuple(n for n in signature.parameters if n in optional and n not in names)
    gm.graph._codegen = OptionalInputs(codegen.pytree_info, fills, absent)
    gm.recompile()
