"""Why a model could not be captured, and the :class:`TraceError` the user reads: the module
path, the operation and the user's source line at fault, with a hint."""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Failure", "FxFailure", "TraceError", "classify", "failure_note", "module_chain", "root_failure",
           "trace_error", "user_frame"]


class TraceError(RuntimeError):
    """The model could not be captured (or its shapes could not be propagated). The
    message names the module path, the operation and the user's source line at fault,
    with a hint."""

    def __init__(self, message: str, module_path: str | None = None, operation: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation


@dataclass
class Failure:
    """Why a module could not be captured: ``kind`` is "value" (a branch on a tensor
    value), "size" (data-dependent shapes: filtering), or "other"."""

    kind: str
    path: str
    operation: str
    where: str | None
    line: str = ""
    exc: BaseException | None = field(default=None, repr=False)


class FxFailure(Exception):
    """Plain fx could not trace a module; ``failure`` says where and why."""

    def __init__(self, failure: Failure):
        super().__init__(failure.operation)
        self.failure = failure


def user_frame(tb) -> tuple[str | None, str]:
    """The innermost traceback frame outside torch and spruce: the user's line that failed."""
    torch_dir = os.path.dirname(torch.__file__)
    spruce_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = None
    for frame in traceback.extract_tb(tb):
        name = frame.filename
        if name.startswith(torch_dir) or name.startswith("<"):
            continue
        if name.startswith(spruce_dir) and "/tests/" not in name and "/bench/" not in name:
            continue
        found = frame
    if found is None:
        return None, ""
    line = (found.line or "").strip()
    return f"{found.filename}:{found.lineno} `{line}`", line


def module_chain(tb, paths: dict[int, str]) -> list[str]:
    """Qualified names of the model's modules whose code was running when ``tb`` was raised,
    outermost first (read from the ``self`` of each frame)."""
    chain: list[str] = []
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        path = paths.get(id(owner)) if owner is not None else None
        if path is not None and (not chain or chain[-1] != path):
            chain.append(path)
    return chain


def classify(exc: BaseException) -> str:
    """"value" for a branch on a tensor value, "size" for data-dependent shapes, else "other"."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GuardOnDataDependentSymNode):
            graph_text = str(getattr(exc, "partial_fx_graph", "") or "")
            symbols = sorted(str(s) for s in getattr(exc.cond, "free_symbols", ()))
            value_lines = [line.split("=", 1)[0] for line in graph_text.splitlines()
                           if re.search(r"= torch\.ops\.aten\.(item|_local_scalar_dense)\b", line)]
            for sym in symbols:
                if sym.startswith(("zuf", "zf")):
                    return "value"
                if any(re.search(rf"\b{re.escape(sym)}\b", line) for line in value_lines):
                    return "value"
            return "size"
        if isinstance(exc, DataDependentOutputException):
            return "value"
        if isinstance(exc, DynamicOutputShapeException):
            return "size"
        exc = exc.__cause__ or exc.__context__
    return "other"


def root_failure(exc: BaseException, paths: dict[int, str]) -> Failure:
    chain = module_chain(exc.__traceback__, paths)
    where, line = user_frame(exc.__traceback__)
    operation = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return Failure(classify(exc), chain[-1] if chain else "", operation, where, line, exc)


def failure_note(failure: Failure) -> str:
    where = f" at {failure.where}" if failure.where else ""
    what = {"size": "filters by data (data-dependent shapes)", "value": "branches on a tensor value"}.get(
        failure.kind, "cannot be exported")
    return f"module '{failure.path or '<root>'}' {what}{where}: {failure.operation}"


def _hint(failure: Failure, root_name: str) -> str:
    line = failure.line
    if re.search(r"\[[^\]]*\]\s*(\+|-|\*|/)?=(?!=)", line):
        return ("item assignment on a traced value: write it as a whole-tensor operation "
                "(torch.where(mask, value, x), index_put or masked_fill) instead of x[...] = ...")
    where = "the model's own forward" if failure.path in ("", "<root>") else f"module '{failure.path}'"
    if failure.kind == "value":
        hint = (f"{where} branches on a tensor value (data-dependent control flow), which a graph captured at "
                "the example input cannot follow: use torch.cond for the branch (torch.where for an elementwise "
                "choice), or keep this code out of the model (leave post-processing eager)")
        if failure.path not in ("", "<root>"):
            hint += (f", or list module '{failure.path}' (or its type) in leaf_modules=[...] so it runs as one "
                     "opaque call and keeps its channels")
        return hint
    if failure.path not in ("", "<root>"):
        return (f"list module '{failure.path}' (or its type) in leaf_modules=[...] so it is kept as one opaque "
                "call, or make its forward capturable by torch.export")
    return "make the model's forward capturable by torch.export (see the operation above)"


def trace_error(failure: Failure, model: nn.Module) -> TraceError:
    path = failure.path or "<root>"
    msg = f"cannot trace module '{path}' ({type(model).__name__} root): {failure.operation}"
    if failure.where:
        msg += f"\n  at {failure.where}"
    msg += f"\n  hint: {_hint(failure, type(model).__name__)}"
    return TraceError(msg, module_path=path, operation=failure.operation)
