"""Acceptance bench for compiling a causal language model (issue 29), with its own time cap.

``python bench/lm.py [--model examples/lm/model] [--splits DIR] [--parts compile,reload,controls,tp]
[--seeds 0,1,2] [--time-cap-min 240]`` runs, in order, what fits in the cap (each part checks the time
left before each run and records what it skipped):

- **compile**: ``spruce compile MODEL --data text:SPLITS`` three ways, per seed: ``--budget latency=0.5
  --recover distill``, ``--budget latency=0.5 --recover none`` and ``--budget decode=0.5 --recover
  distill``. Read from each report.json: the measured ratio of the budget and its band, held-out
  perplexity of dense and compiled (the ``lm_evaluation`` section), next-token agreement, prefill and
  decode ratios, recovery steps, wall time.
- **reload**: each compile's ``hf/`` folder loaded by stock transformers in a fresh process with no
  spruce import (checked: ``spruce`` not in ``sys.modules``), ``generate`` run on a held-out prompt.
- **controls** (per seed, paired with the compile of the same seed): the compiled architecture (the
  ``latency=0.5 --recover distill`` result's config) trained from scratch (a) on the recovery tokens,
  distilled from the same teacher (the same next-token KL, :func:`spruce.compiler.lm.lm_kl`, the same
  token count as spruce's recovery; a from-scratch learning rate with warm-up and cosine decay, as the
  example's training script uses), and (b) on the dense model's training tokens plus the recovery
  tokens with the example's own training script (``examples/lm/train_lm.py --arch ... --tokens ...``).
  Each is evaluated on the same held-out windows as spruce (:func:`spruce.runtime.lm_eval.perplexity`);
  spruce's perplexity must be lower than (a)'s and (b)'s; a paired t-test over seeds is reported.
- **tp**: Torch-Pruning's LLM recipe (uniform width, group magnitude importance, heads kept, the
  output head ignored) tried on the example in a child process with a timeout; where it fails its
  error is recorded and uniform-width L1 through ``spruce.prune`` is the baseline instead. The
  baseline's width is searched so that its measured prefill latency (ONNX Runtime CPU, batch 1, the
  example's length, interleaved with dense) is within 0.02 of spruce's measured ratio, then it gets
  spruce's distillation (the same KL loop and token count, at compile's recovery learning rate) and
  its held-out perplexity is compared with spruce's.

Figures go to ``bench/results/lm.md`` (sections "Compile runs", "Controls", "Torch-Pruning side by
side"; other sections, such as the data helper's "Capacity gate", are kept) with the commands and
``/proc/loadavg`` at the start and end of each part, and all records to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from gpu import replace_section

REPO = benchlib.BENCH_DIR.parent
DEFAULT_MODEL = REPO / "examples" / "lm" / "model"
TRAIN_SCRIPT = REPO / "examples" / "lm" / "train_lm.py"
COMPILE_RUNS = {  # name -> compile options
    "latency_distill": ["--budget", "latency=0.5", "--recover", "distill"],
    "latency_none": ["--budget", "latency=0.5", "--recover", "none"],
    "decode_distill": ["--budget", "decode=0.5", "--recover", "distill"],
}
SECTIONS = {"compile": "## Compile runs (bench/lm.py)", "controls": "## Controls: the compiled architecture from "
            "scratch (bench/lm.py)", "tp": "## Torch-Pruning side by side (bench/lm.py)"}
LATENCY_TOLERANCE = 0.02  # the baseline's measured ratio within this of spruce's


class Clock:
    """The bench's time cap: seconds left, and whether a run of ``need_s`` still fits."""

    def __init__(self, cap_s: float):
        self.deadline = time.monotonic() + cap_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, need_s: float) -> bool:
        return self.left() > need_s


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return benchlib.load_average()


def _run(argv: list[str], timeout_s: float, log: Path) -> tuple[int | None, float]:
    """Run ``argv`` with its output to ``log``; (exit code or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1),
                                  cwd=REPO.parent, check=False).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - start


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
    except OSError:
        return ""


SPRUCE_CLI = "import sys; from spruce.cli.main import main; sys.exit(main(sys.argv[1:]))"


def compile_command(model: Path, splits: Path, options: list[str], seed: int, out: Path) -> list[str]:
    return [sys.executable, "-c", SPRUCE_CLI, "compile", str(model), "--data", f"text:{splits}", *options,
            "--seed", str(seed), "--out", str(out), "--force"]


def summarize_report(out: Path) -> dict[str, Any]:
    """The figures of one compile's report.json (missing keys as None)."""
    doc = json.loads((out / "report.json").read_text())
    lm = doc.get("lm_evaluation") or {}
    ev = lm.get("evaluation") or {}
    budget = doc.get("budget") or {}
    recovery = doc.get("recovery") or {}
    return {"dense_perplexity": ev.get("dense_perplexity"), "compiled_perplexity": ev.get("compiled_perplexity"),
            "perplexity_ratio": ev.get("perplexity_ratio"), "next_token_agreement": ev.get("next_token_agreement"),
            "continuations": ev.get("continuations"), "measured_ratio": budget.get("measured_ratio"),
            "in_band": budget.get("in_band"), "band": budget.get("band"), "bench_ratio": budget.get("bench_ratio"),
            "prefill_ratio": lm.get("prefill_ratio"), "decode_ratio": lm.get("decode_ratio"),
            "decode": lm.get("decode"), "params": [ev.get("dense", {}).get("parameters"),
                                                    ev.get("compiled", {}).get("parameters")],
            "removed": (ev.get("removed") or {}).get("config"), "recovery_steps": recovery.get("steps"),
            "recover_tokens": (doc.get("language_model") or {}).get("recover_tokens"),
            "floor": (doc.get("floor") or {}).get("passed") if isinstance(doc.get("floor"), dict) else None,
            "wall_s": doc.get("wall_s")}


def part_compile(args: argparse.Namespace, clock: Clock, record: dict[str, Any]) -> None:
    runs = record.setdefault("compile", {})
    for seed in args.seeds:
        for name, options in COMPILE_RUNS.items():
            key = f"{name}/seed{seed}"
            if not clock.fits(args.compile_min_s):
                runs[key] = {"skipped": f"time cap: {clock.left():.0f} s left"}
                continue
            out = args.work / "compile" / f"{name}_seed{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            command = compile_command(args.model, args.splits, options, seed, out)
            code, seconds = _run(command, min(clock.left(), args.compile_timeout_s), out.parent / f"{out.name}.log")
            entry: dict[str, Any] = {"command": " ".join(["spruce", *command[3:]]), "exit": code, "seconds": seconds,
                                     "load_end": loadavg()}
            if (out / "report.json").is_file():
                entry.update(summarize_report(out))
            else:
                entry["error"] = _tail(out.parent / f"{out.name}.log")
            runs[key] = entry
            print(key, json.dumps({k: entry.get(k) for k in ("exit", "measured_ratio", "compiled_perplexity")}),
                  flush=True)


RELOAD_SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer("def main(argv):\\n    parser = ", return_tensors="pt")
out = model.generate(**ids, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                     pad_token_id=tokenizer.pad_token_id)
print(json.dumps({"spruce_imported": any(m == "spruce" or m.startswith("spruce.") for m in sys.modules),
                  "text": tokenizer.decode(out[0][ids["input_ids"].shape[1]:]), "model": type(model).__name__}))
"""


def part_reload(args: argparse.Namespace, clock: Clock, record: dict[str, Any]) -> None:
    reloads = record.setdefault("reload", {})
    for key in record.get("compile", {}):
        folder = args.work / "compile" / key.replace("/", "_") / "hf"
        if not folder.is_dir() or not clock.fits(60):
            reloads[key] = {"skipped": "no hf/ folder" if not folder.is_dir() else "time cap"}
            continue
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder)], capture_output=True, text=True,
                              timeout=300, cwd="/", env=env, check=False)
        try:
            reloads[key] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            reloads[key] = {"error": (done.stderr or done.stdout)[-400:]}


# --- training from scratch and distillation (controls and the baseline) ---------------------------------------


def _loaders(args: argparse.Namespace, sequence_length: int, seed: int, batch_size: int) -> Any:
    from spruce.compiler.text import load_text

    return load_text(f"text:{args.splits}", str(args.model), sequence_length, seed=seed, batch_size=batch_size)


def distill(student: Any, teacher: Any, loader: Any, tokens: int, lr: float, warmup_steps: int, seed: int,
            pad: int | None, clock: Clock) -> dict[str, Any]:
    """Train ``student`` on next-token KL from ``teacher`` (spruce's LM distillation loss) over
    ``tokens`` real input tokens of ``loader`` (cycled), AdamW at ``lr`` with linear warm-up and
    cosine decay. Returns steps, tokens seen, seconds and whether the time cap cut it short."""
    import torch
    from spruce.compiler.lm import lm_kl

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    per_batch = None
    seen, steps, start, cut = 0, 0, time.perf_counter(), False
    student.train()
    teacher.eval()
    while seen < tokens:
        for batch in loader:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            per_batch = per_batch or int(mask.sum())
            total_steps = max(1, math.ceil(tokens / per_batch))
            progress = min(steps / total_steps, 1.0)
            scale = min(1.0, (steps + 1) / max(warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            with torch.no_grad():
                target = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = lm_kl(logits, target, ids, pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            steps += 1
            seen += int(mask.sum())
            if seen >= tokens:
                break
            if not clock.fits(60):
                cut = True
                break
        if cut:
            break
    student.eval()
    return {"steps": steps, "tokens": seen, "seconds": time.perf_counter() - start, "cut_by_time_cap": cut}


def _teacher(args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model).eval()


def _training_record(model_folder: Path) -> dict[str, Any]:
    path = model_folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _recovery_tokens(args: argparse.Namespace) -> int:
    """The token budget of spruce's recovery: 10 % of the dense model's training tokens."""
    trained = _training_record(args.model)
    return max(1, int(0.1 * int(trained.get("tokens_trained", trained.get("tokens", 0)))))


def _held_out_perplexity(model: Any, loaders: Any) -> float:
    from spruce.runtime.lm_eval import perplexity

    return perplexity(model, loaders.test).value


def _arch_flag(config: dict[str, Any]) -> str:
    return (f"hidden={config['hidden_size']},layers={config['num_hidden_layers']},"
            f"heads={config['num_attention_heads']},kv_heads={config['num_key_value_heads']},"
            f"intermediate={config['intermediate_size']},head_dim={config.get('head_dim') or 0}")


def part_controls(args: argparse.Namespace, clock: Clock, record: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    controls = record.setdefault("controls", {})
    trained = _training_record(args.model)
    sequence_length = int(trained.get("sequence_length", 128))
    recovery_tokens = _recovery_tokens(args)
    teacher = _teacher(args)
    pad = teacher.config.pad_token_id
    for seed in args.seeds:
        compiled = args.work / "compile" / f"latency_distill_seed{seed}" / "hf"
        if not compiled.is_dir():
            controls[f"seed{seed}"] = {"skipped": f"no compiled model for seed {seed} ({compiled})"}
            continue
        config = AutoConfig.from_pretrained(compiled)
        entry: dict[str, Any] = {"arch": _arch_flag(config.to_dict()), "recovery_tokens": recovery_tokens}
        loaders = _loaders(args, sequence_length, seed, args.batch_size)
        if clock.fits(args.control_min_s):  # (a) from scratch, distilled on the recovery tokens
            torch.manual_seed(seed)
            student = AutoModelForCausalLM.from_config(config)
            run = distill(student, teacher, loaders.train, recovery_tokens, args.scratch_lr, 100, seed, pad, clock)
            entry["a_distilled_on_recovery_tokens"] = {**run, "perplexity": _held_out_perplexity(student, loaders)}
        else:
            entry["a_distilled_on_recovery_tokens"] = {"skipped": "time cap"}
        dense_tokens = int(trained.get("tokens_trained", 0))
        out = args.work / "controls" / f"b_seed{seed}"
        if dense_tokens and clock.fits(args.control_min_s):  # (b) from scratch on dense + recovery tokens
            command = [sys.executable, str(TRAIN_SCRIPT), "--out", str(out), "--splits", str(args.splits),
                       "--seed", str(seed), "--arch", entry["arch"], "--tokens", str(dense_tokens + recovery_tokens),
                       "--tokenizer", str(args.model), "--seq", str(sequence_length)]
            code, seconds = _run(command, clock.left() - 30, out.parent / f"b_seed{seed}.log")
            b: dict[str, Any] = {"command": " ".join(command[1:]), "exit": code, "seconds": seconds}
            if code == 0:
                b["perplexity"] = _held_out_perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), loaders)
            else:
                b["error"] = _tail(out.parent / f"b_seed{seed}.log")
            entry["b_trained_on_dense_plus_recovery_tokens"] = b
        else:
            entry["b_trained_on_dense_plus_recovery_tokens"] = {
                "skipped": "time cap" if dense_tokens else "no training.json tokens"}
        spruce_run = record.get("compile", {}).get(f"latency_distill/seed{seed}", {})
        entry["spruce_perplexity"] = spruce_run.get("compiled_perplexity")
        controls[f"seed{seed}"] = entry
        print(f"controls seed{seed}", json.dumps(entry)[:300], flush=True)


# --- Torch-Pruning and the uniform-width baseline ------------------------------------------------------------

TP_SCRIPT = """
import json, sys, traceback
import torch, torch_pruning as tp
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
model.config.use_cache = sys.argv[4] == "cache"  # the model's own output, or logits and no cache object
ratio = float(sys.argv[2])
config = model.config
ids = torch.randint(3, config.vocab_size, (1, int(sys.argv[3])))
num_heads = {}
for name, module in model.named_modules():
    if name.endswith("self_attn"):
        num_heads[module.q_proj] = config.num_attention_heads
        num_heads[module.k_proj] = config.num_key_value_heads
        num_heads[module.v_proj] = config.num_key_value_heads
try:
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.MetaPruner(model, example_inputs=ids, importance=importance, global_pruning=False,
                                  pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
                                  prune_num_heads=False, prune_head_dims=False, round_to=8)
    pruner.step()
    model(ids)
    print(json.dumps({"ok": True, "params": sum(p.numel() for p in model.parameters())}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                      "where": traceback.format_exc().strip().splitlines()[-3][:300]}))
"""


def _prefill_ratio(dense: Any, compact: Any, ids: Any, rounds: int) -> float:
    """Measured compact / dense prefill latency (ONNX Runtime CPU, batch 1), interleaved."""
    from spruce.runtime.decode import LogitsOnly
    from spruce.targets.base import get_target

    target = get_target("onnxruntime")
    dense_t, compact_t = target.measure_models([(LogitsOnly(dense), (ids,)), (LogitsOnly(compact), (ids,))],
                                               warmup=3, rounds=rounds)
    return compact_t.robust_ms() / dense_t.robust_ms()


def part_tp(args: argparse.Namespace, clock: Clock, record: dict[str, Any]) -> None:
    import spruce
    import torch

    tp_record = record.setdefault("tp", {})
    trained = _training_record(args.model)
    sequence_length = int(trained.get("sequence_length", 128))
    attempts = {}
    for cache in ("cache", "no-cache"):  # as loaded; then with use_cache=False (its output without a cache object)
        try:
            done = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(args.model), "0.5", str(sequence_length),
                                   cache], capture_output=True, text=True, timeout=args.tp_timeout_s, check=False)
            attempts[cache] = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            attempts[cache] = {"ok": False, "error": f"no result within {args.tp_timeout_s:.0f} s (killed)"}
        except (IndexError, ValueError):
            attempts[cache] = {"ok": False, "error": (done.stderr or done.stdout)[-500:]}
        if attempts[cache].get("ok"):
            break
    tp_record["torch_pruning"] = {**attempts[cache], "attempts": attempts,
                                  "version": benchlib.package_version("torch-pruning")}
    spruce_run = record.get("compile", {}).get(f"latency_distill/seed{args.seeds[0]}", {})
    aim = spruce_run.get("measured_ratio") or args.tp_aim
    tp_record["aim"] = {"ratio": aim, "from": "spruce's measured ratio" if spruce_run.get("measured_ratio")
                        else "--tp-aim (no compile result)"}
    teacher = _teacher(args)
    ids = torch.randint(3, teacher.config.vocab_size, (1, sequence_length), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids}
    seq = torch.export.Dim("seq", min=2, max=max(sequence_length, 2) * 4)
    low, high, tries = 0.0, 0.95, []
    chosen = None
    for _ in range(args.tp_search_steps):  # bisect the removed fraction on the measured ratio
        if not clock.fits(120):
            break
        ratio = (low + high) / 2
        compact = spruce.prune(teacher, example, ratio=ratio, importance="l1",
                               dynamic_shapes={"input_ids": {1: seq}}).model.eval()
        measured = _prefill_ratio(teacher, compact, ids, args.rounds)
        tries.append({"removed": ratio, "measured_ratio": measured, "load": loadavg()})
        print("tp baseline", tries[-1], flush=True)
        if abs(measured - aim) <= LATENCY_TOLERANCE:
            chosen = (ratio, compact, measured)
            break
        low, high = (ratio, high) if measured > aim else (low, ratio)
    tp_record["search"] = tries
    if chosen is None:
        tp_record["baseline"] = {"skipped": f"no width within {LATENCY_TOLERANCE} of {aim:.3f} measured"}
        return
    ratio, compact, measured = chosen
    baseline = spruce.to_transformers(compact, teacher).eval()
    entry: dict[str, Any] = {"removed": ratio, "measured_ratio": measured,
                             "params": sum(p.numel() for p in baseline.parameters())}
    loaders = _loaders(args, sequence_length, args.seeds[0], args.batch_size)
    entry["one_shot_perplexity"] = _held_out_perplexity(baseline, loaders)
    if clock.fits(args.control_min_s):
        entry["distill"] = distill(baseline, teacher, loaders.train, _recovery_tokens(args), args.recover_lr, 0,
                                   args.seeds[0], teacher.config.pad_token_id, clock)
        entry["perplexity"] = _held_out_perplexity(baseline, loaders)
    entry["spruce_perplexity"] = spruce_run.get("compiled_perplexity")
    tp_record["baseline"] = entry


# --- the results file --------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(record: dict[str, Any]) -> dict[str, list[str]]:
    """The results file's sections (heading -> lines) for the parts that ran."""
    sections: dict[str, list[str]] = {}
    head = [f"Command: `{record['command']}`; load (/proc/loadavg) at start `{record['load_start']}`, at end "
            f"`{record['load_end']}`; time cap {record['time_cap_min']} min.", ""]
    if "compile" in record:
        rows = [[key, r.get("exit"), _f(r.get("measured_ratio")), _f(r.get("bench_ratio")),
                 _f(r.get("dense_perplexity"), 2), _f(r.get("compiled_perplexity"), 2), _f(r.get("perplexity_ratio")),
                 _f(r.get("next_token_agreement")), _f((r.get("decode_ratio") or {}).get("1")),
                 _f(r.get("wall_s"), 0), r.get("skipped") or r.get("error") or ""]
                for key, r in record["compile"].items()]
        sections[SECTIONS["compile"]] = [SECTIONS["compile"], "", *head,
                                         "Budget band: measured ratio within [0.45, 0.525] of dense.", "",
                                         *benchlib.markdown_table(
                                             ["run", "exit", "measured ratio", "bench ratio", "dense ppl",
                                              "compiled ppl", "ppl ratio", "next-token agreement",
                                              "decode ratio (batch 1)", "wall s", "note"], rows), ""]
        for key, r in record["compile"].items():
            if r.get("command"):
                sections[SECTIONS["compile"]].append(f"- `{key}`: `{r['command']}` (load at end `{r.get('load_end')}`)")
        if record.get("reload"):
            sections[SECTIONS["compile"]] += ["", "HF folder reload in a fresh process without spruce:", ""]
            sections[SECTIONS["compile"]] += [f"- `{k}`: {json.dumps(v)[:300]}" for k, v in record["reload"].items()]
        sections[SECTIONS["compile"]].append("")
    if "controls" in record:
        a = {k: v["a_distilled_on_recovery_tokens"].get("perplexity") for k, v in record["controls"].items()
             if isinstance(v.get("a_distilled_on_recovery_tokens"), dict)}
        b = {k: v["b_trained_on_dense_plus_recovery_tokens"].get("perplexity") for k, v in record["controls"].items()
             if isinstance(v.get("b_trained_on_dense_plus_recovery_tokens"), dict)}
        ours = {k: v.get("spruce_perplexity") for k, v in record["controls"].items()}
        rows = [[k, _f(ours.get(k), 2), _f(a.get(k), 2), _f(b.get(k), 2), v.get("skipped", "")]
                for k, v in record["controls"].items()]
        lines = [SECTIONS["controls"], "", *head, *benchlib.markdown_table(
            ["seed", "spruce ppl", "(a) scratch, distilled on recovery tokens", "(b) scratch, dense + recovery tokens",
             "note"], rows), ""]
        for name, other in (("(a)", a), ("(b)", b)):
            pairs = {k: ours[k] for k in ours if ours[k] is not None and other.get(k) is not None}
            test = benchlib.paired_t(pairs, {k: other[k] for k in pairs}) if len(pairs) >= 2 else None
            lines.append(f"- spruce vs {name}: " + (f"mean gap {test[0]:+.2f} perplexity (negative: spruce lower), "
                                                   f"paired t p = {test[1]:.3g}, {test[2]} seeds" if test else
                                                   f"{len(pairs)} paired seed(s): no test"))
        sections[SECTIONS["controls"]] = lines
    if "tp" in record:
        tp = record["tp"]
        lines = [SECTIONS["tp"], "", *head,
                 f"Torch-Pruning {tp['torch_pruning'].get('version')} LLM recipe on the example: "
                 + "; ".join(f"{mode}: " + ("ran" if a.get("ok") else
                                            f"failed: `{a.get('error')}` ({a.get('where', '')})")
                             for mode, a in tp["torch_pruning"].get("attempts", {}).items())
                 + "; baseline: uniform-width L1 through `spruce.prune`, width searched on measured prefill latency "
                 f"(aim {_f(tp['aim']['ratio'])}, {tp['aim']['from']}).", ""]
        lines += benchlib.markdown_table(["removed fraction", "measured ratio", "load"],
                                         [[_f(t["removed"]), _f(t["measured_ratio"]), t["load"]]
                                          for t in tp.get("search", [])])
        base = tp.get("baseline", {})
        lines += ["", f"Baseline: {json.dumps(base)[:600]}", ""]
        sections[SECTIONS["tp"]] = lines
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--splits", type=Path, default=None,
                        help="text splits (recover/, heldout/); default: written by train_lm.py --splits-only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spruce-lm-bench"))
    parser.add_argument("--parts", default="compile,reload,controls,tp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--time-cap-min", type=float, default=240.0)
    parser.add_argument("--compile-timeout-s", type=float, default=45 * 60)
    parser.add_argument("--compile-min-s", type=float, default=10 * 60, help="start a compile only with this left")
    parser.add_argument("--control-min-s", type=float, default=10 * 60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scratch-lr", type=float, default=3e-3)
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tp-timeout-s", type=float, default=600)
    parser.add_argument("--tp-aim", type=float, default=0.5)
    parser.add_argument("--tp-search-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR / "lm.md")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"compile", "reload", "controls", "tp"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.splits is None:
        args.splits = args.work / "splits"
        if not (args.splits / "recover").is_dir():
            subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--splits-only", "--splits", str(args.splits)],
                           check=True)
    clock = Clock(60 * args.time_cap_min)
    record: dict[str, Any] = {"command": "python bench/lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "load_start": loadavg(), "time_cap_min": args.time_cap_min, "model": str(args.model),
                              "info": benchlib.machine_info(("transformers", "torch-pruning"))}
    for part in parts:
        {"compile": part_compile, "reload": part_reload, "controls": part_controls, "tp": part_tp}[part](
            args, clock, record)
    record["load_end"] = loadavg()
    if args.json:
        benchlib.write_atomic(args.json, json.dumps(record, indent=2, default=str))
    text = args.out.read_text() if args.out.exists() else "# Language models (issue 29)\n"
    for heading, lines in render(record).items():
        text = replace_section(text, heading, lines)
    benchlib.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
