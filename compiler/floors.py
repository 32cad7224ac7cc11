"""The fidelity floor: the checks a compiled model must pass besides its budget.

By default each output's kind gives one check (:mod:`spruce.compiler.kinds`: top-1
agreement >= 0.9 for class scores, mIoU >= 0.8 for per-pixel scores, sequence agreement >= 0.9
for CTC heads, cosine >= 0.7 for maps). The recipe's ``floor`` (the CLI's ``--floor``,
repeatable) replaces them: a list of ``MEASURE>=VALUE`` checks, each on every output with that
measure or on one output (``output[0]:cosine>=0.8``), or on one of the user's ``evaluate``
metrics (``word_acc>=0.95``, judged on the compiled model's value); an empty list checks nothing.

A compile that misses its floor has failed even when it met its budget: its artifacts are
written and kept, ``report.json`` holds ``"floor": {"met": false, ...}``, the first line of
``report.md`` says so, the compiled artifact's manifest carries the same record, and then
``spruce.compile`` raises :class:`FidelityFloorError` (the CLI exits 1 with one line).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..targets.files import atomic_write_text
from .kinds import KINDS, MEASURES, Floor, parse_floor

__all__ = ["FidelityFloorError", "FloorCheck", "FloorResult", "check_floor_names", "check_floors",
           "floor_line", "mark_manifest", "raise_if_missed", "resolve_floors"]


class FidelityFloorError(RuntimeError):
    """A compile met its budget (or not) but missed its fidelity floor. ``report`` is the
    :class:`~spruce.compiler.reporting.CompileReport` (its artifacts stay in ``report.out_dir``);
    the message is one line naming every check missed."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class FloorCheck:
    """One check as judged: the floor, the output (None: a user metric), the value found."""

    floor: Floor
    output: str | None
    actual: float

    @property
    def met(self) -> bool:
        return not math.isnan(self.actual) and self.floor.met(self.actual)

    def text(self) -> str:
        where = f"{self.output} " if self.output else ""
        return f"{where}{self.floor.measure} {self.actual:.4g} (floor {self.floor.op} {self.floor.value:g})"

    def record(self) -> dict[str, Any]:
        return {"output": self.output, "measure": self.floor.measure, "op": self.floor.op,
                "floor": self.floor.value, "actual": self.actual, "met": self.met}


@dataclass(frozen=True)
class FloorResult:
    """Every check of a compile, and where the floors came from."""

    checks: tuple[FloorCheck, ...]
    source: str

    @property
    def met(self) -> bool:
        return all(check.met for check in self.checks)

    def record(self) -> dict[str, Any]:
        return {"met": self.met, "source": self.source, "checks": [c.record() for c in self.checks],
                "missed": [c.text() for c in self.checks if not c.met]}


def resolve_floors(given: Sequence[str | Floor] | None, plan: Any) -> tuple[list[tuple[Floor, str | None]], str]:
    """The checks to run, each (floor, output path or None for a user metric), and their
    source: ``given`` (recipe strings or floors) when not None, else each output's kind's floor."""
    if given is None:
        return ([(KINDS[s.kind].floor, s.name) for s in plan.outputs if KINDS[s.kind].floor is not None],
                "default per output kind")
    checks: list[tuple[Floor, str | None]] = []
    for item in given:
        floor = parse_floor(item) if isinstance(item, str) else item
        if not floor.is_fidelity:
            checks.append((floor, None))
            continue
        for spec in plan.outputs:
            if floor.measure in spec.measures and (floor.output is None or floor.output == spec.name):
                checks.append((floor, spec.name))
    return checks, "recipe"


def check_floor_names(given: Sequence[str] | None, plan: Any, metric_names: Sequence[str] | None) -> None:
    """Raise ``ValueError`` (before any training) when a given floor names a fidelity measure
    no output has, an output that does not exist, or a metric while no ``evaluate`` gives it
    (``metric_names``: the names the user's ``evaluate`` returned, None without one)."""
    outputs = {spec.name: spec for spec in plan.outputs}
    for text in given or ():
        floor = parse_floor(text)
        if floor.output is not None and floor.output not in outputs:
            raise ValueError(f"floor {text!r}: no output {floor.output!r}; outputs are {', '.join(outputs)}")
        if floor.is_fidelity:
            having = [s for s in plan.outputs if floor.measure in s.measures
                      and (floor.output is None or floor.output == s.name)]
            if not having:
                raise ValueError(f"floor {text!r}: no output of kind with measure {floor.measure} "
                                 f"(outputs: {', '.join(f'{s.name} {s.kind}' for s in plan.outputs)})")
        elif floor.output is not None:
            raise ValueError(f"floor {text!r}: {floor.measure} is no fidelity measure ({', '.join(MEASURES)}), "
                             "and an evaluate metric has no output")
        elif metric_names is None:
            raise ValueError(f"floor {text!r}: {floor.measure} is no fidelity measure ({', '.join(MEASURES)}); "
                             "a floor on a metric of yours needs evaluate=FILE.py:evaluate")
        elif floor.measure not in metric_names:
            raise ValueError(f"floor {text!r}: evaluate returns no {floor.measure!r} (it returns "
                             f"{', '.join(metric_names) or 'nothing'})")


def check_floors(given: Sequence[str | Floor] | None, plan: Any, per_output: Mapping[str, Mapping[str, float]],
                 metrics: Mapping[str, float]) -> FloorResult:
    """Judge the floors (:func:`resolve_floors`) on the compiled model's fidelity
    ``per_output`` (output -> measure -> value) and user ``metrics``; a value missing counts NaN (missed)."""
    resolved, source = resolve_floors(given, plan)
    checks = []
    for floor, output in resolved:
        values = metrics if output is None else per_output.get(output, {})
        checks.append(FloorCheck(floor, output, float(values.get(floor.measure, math.nan))))
    return FloorResult(tuple(checks), source)


def floor_line(record: Mapping[str, Any] | None) -> str | None:
    """The one line saying a floor was missed (None when met or not checked)."""
    if not record or record.get("met", True):
        return None
    return "fidelity floor missed: " + "; ".join(record.get("missed", []))


def raise_if_missed(report: Any) -> None:
    """Raise :class:`FidelityFloorError` when ``report`` (a CompileReport) missed its floor."""
    line = floor_line(report.document.get("floor"))
    if line is not None:
        raise FidelityFloorError(f"{line} (artifacts kept in {report.out_dir}, marked in report.json)", report)


def mark_manifest(manifest: Path, record: Mapping[str, Any]) -> None:
    """Add ``record`` as ``"fidelity_floor"`` to the artifact manifest at ``manifest`` (atomically;
    the manifest's pins are unchanged)."""
    document = json.loads(Path(manifest).read_text(encoding="utf-8"))
    document["fidelity_floor"] = dict(record)
    atomic_write_text(Path(manifest), json.dumps(document, indent=2) + "\n")


def report_lines(evaluation: Mapping[str, Any] | None, floor: Mapping[str, Any] | None,
                 distilled: bool = True, warn_guessed: bool = True) -> list[str]:
    """The report's lines on outputs (their kinds, a warning for each guessed one unless not
    ``warn_guessed``), fidelity and user metrics, and the floor (for the console table and
    ``report.md``); each output's distillation loss is named only when recovery ``distilled``."""
    lines: list[str] = []
    outputs = {o["output"]: o for o in (evaluation or {}).get("outputs", [])}
    if evaluation and evaluation.get("fidelity"):
        lines += ["", f"fidelity to dense on {evaluation['fidelity']['samples']} held-out inputs:"]
        for name, row in evaluation["fidelity"]["per_output"].items():
            spec = outputs.get(name, {})
            kind = spec.get("kind", "?")
            if "kind_from" in spec:
                kind += " (declared)" if spec["kind_from"] == "declared" else \
                    " (recognised)" if str(spec["kind_from"]).startswith("recognised") else " (guessed)"
            values = ", ".join(f"{measure.replace('_', ' ')} {value:.4f}" for measure, value in row.items())
            loss = f" (distill loss {spec.get('distill_loss')})" if distilled else ""
            lines.append(f"  {name}: {kind}: {values}{loss}")
        for which in ("dense", "compiled"):
            if evaluation.get(f"{which}_metrics"):
                lines.append(f"  {which} metrics: " + ", ".join(f"{k} {v:.4f}"
                                                                 for k, v in evaluation[f"{which}_metrics"].items()))
    guessed = [o for o in outputs.values() if warn_guessed and str(o.get("kind_from", "")).startswith("guessed")]
    for o in guessed:
        lines.append(f"warning: output {o['output']} {o['shape']}: kind {o['kind']} {o['kind_from']}; declare it "
                     f"(outputs: {{{o['output']!r}: {{kind: ...}}}}) if it is something else")
    if floor:
        checks = [FloorCheck(Floor(c["measure"], c["op"], c["floor"]), c["output"], c["actual"])
                  for c in floor.get("checks", [])]
        if not checks:
            lines += ["", "fidelity floor: no checks"]
        else:
            verdict = "fidelity floor met" if floor.get("met") else "FIDELITY FLOOR MISSED"
            lines += ["", f"{verdict} ({floor.get('source')}): " + "; ".join(c.text() for c in checks)]
    return lines
