"""Shared helpers for the benchmarks in ``bench/``.

Building torchvision models with their required input, running one model per
fresh subprocess (with a timeout and an address-space cap), reading peak
memory, describing the machine, and writing result files atomically.

Children report results by printing lines ``RESULT_MARKER + json`` to stdout;
a child may print several (one after each stage) so that a child killed late
still leaves its last complete stage behind. The parent keeps the last one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARKER = "@@BENCH_RESULT@@ "
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# torchvision classifiers whose stem needs an input other than 224x224 and that do
# not say so through a ``image_size`` attribute (VisionTransformer does).
SPECIAL_INPUT_SIZES: dict[str, int] = {"inception_v3": 299}
DEFAULT_INPUT_SIZE = 224
NUM_CLASSES = 1000


# ----------------------------------------------------------------------------- models


def zoo_model_names() -> list[str]:
    """All torchvision classification model names, in torchvision's order."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def input_size_for(name: str, model: Any) -> int:
    """Side of the square input ``model`` (torchvision ``name``) requires.

    ViTs store their fixed ``image_size``; Inception v3 needs 299; everything else
    takes the ImageNet default of 224.
    """
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return size
    return SPECIAL_INPUT_SIZES.get(name, DEFAULT_INPUT_SIZE)


def build_model(name: str, seed: int = 0) -> tuple[Any, tuple[int, int, int, int]]:
    """Build torchvision model ``name`` with seeded random weights, in eval mode.

    Returns the model and the input shape ``(1, 3, H, W)`` it requires.
    """
    import warnings

    import torch
    import torchvision

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception warn about init_weights
        model = torchvision.models.get_model(name, weights=None)
    model.eval()
    side = input_size_for(name, model)
    return model, (1, 3, side, side)


def make_nondegenerate(model: Any, shape: Sequence[int], seed: int = 0) -> None:
    """Give a randomly initialised ``model`` weights under which its output is not ~0.

    Freshly built torchvision models often output (nearly) zero: ViT heads are
    zero-initialised, and eval-mode BatchNorm with unit running stats lets
    activations shrink to 1e-16 through EfficientNet/MobileNet. An equivalence check
    scaled by ``max(1, max|output|)`` then passes whatever the pruned model computes.
    The shared helper of the tests and benchmarks does it
    (``spruce.api.checks.make_nondegenerate``: all-zero weights drawn, tiny layer
    scales raised, BatchNorm statistics re-estimated at a random batch of 4 of ``shape``).
    Leaves ``model`` in eval mode.
    """
    from spruce.api.checks import make_nondegenerate as shared

    shared(model, random_input((4, *shape[1:]), seed=seed + 100), seed=seed)


def random_input(shape: Sequence[int], seed: int) -> Any:
    """A seeded standard-normal float32 tensor of ``shape``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def classifier_layers(model: Any) -> list[Any]:
    """The final classifier layers: Linear/Conv2d modules producing the 1000 classes.

    More than one for models with auxiliary heads (GoogLeNet, Inception v3).
    """
    from torch import nn

    def produces_classes(module: Any) -> bool:
        if isinstance(module, nn.Linear):
            return module.out_features == NUM_CLASSES
        return isinstance(module, nn.Conv2d) and module.out_channels == NUM_CLASSES

    return [module for module in model.modules() if produces_classes(module)]


def output_tensors(output: Any) -> list[Any]:
    """Every tensor in a (possibly nested tuple/list/dict/namedtuple) model output."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def model_run_error(model: Any, example_inputs: Sequence[Any],
                    expected_shape: tuple[int, ...]) -> str | None:
    """None if ``model`` runs (eval, no grad) on ``example_inputs`` and its first output
    has ``expected_shape``; else a short error."""
    import torch

    try:
        model.eval()
        with torch.no_grad():
            output = output_tensors(model(*example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure is a result here
        return short_error(exc)
    shape = tuple(output[0].shape) if output else None
    if shape != tuple(expected_shape):
        return f"output shape {shape} != {tuple(expected_shape)}"
    return None


def count_params(model: Any) -> int:
    """Parameter elements of ``model`` (spruce's counter when it exists)."""
    try:
        from spruce.api.stats import count_params as spruce_count_params
    except ImportError:
        return sum(p.numel() for p in model.parameters())
    return int(spruce_count_params(model))


def count_macs(model: Any, example_inputs: Sequence[Any]) -> int:
    """Multiply-accumulates of one forward pass (spruce's counter when it exists).

    The fallback uses torch's FlopCounterMode; one MAC is two FLOPs.
    """
    try:
        from spruce.api.stats import count_macs as spruce_count_macs
    except ImportError:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(*example_inputs)
        return int(counter.get_total_flops() // 2)
    return int(spruce_count_macs(model, example_inputs))


# ----------------------------------------------------------------------------- child side


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux ``clear_refs``).

    After it, :func:`peak_rss_mb` reports the peak of what runs next, not of the model
    build before. Returns False where the kernel does not support it (peak unchanged).
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def cap_address_space(limit_gb: float | None) -> None:
    """Cap this process's virtual address space at ``limit_gb`` GiB (no-op if None/0).

    Called first thing in a child, before torch is imported, so an allocation
    beyond the cap raises inside the child instead of swapping the machine.
    """
    if not limit_gb:
        return
    limit = int(limit_gb * 1024**3)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in torch."""
    import torch

    torch.set_num_threads(max(1, threads))


def emit(result: dict[str, Any]) -> None:
    """Report ``result`` (JSON-serialisable) to the parent process."""
    sys.stdout.write(RESULT_MARKER + json.dumps(result, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    """JSON fallback for numpy scalars and other number-likes."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def short_error(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    message = str(exc).strip().splitlines()
    first = message[0] if message else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` and return ``(its result, wall seconds)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# ----------------------------------------------------------------------------- parent side


@dataclass
class ChildOutcome:
    """What one child process left behind.

    ``status`` is ``"exited"`` (any exit code), ``"timeout"`` or ``"killed"`` (by a
    signal); ``result`` is the last reported result dict (empty if none).
    """

    status: str
    returncode: int | None
    wall_s: float
    result: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""


def run_child(argv: Sequence[str], timeout_s: float) -> ChildOutcome:
    """Run ``python argv...`` in a fresh process and collect its last reported result.

    The child is killed when it runs past ``timeout_s`` seconds.
    """
    command = [sys.executable, *argv]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        process = subprocess.Popen(
            command, stdout=out_file, stderr=err_file, stdin=subprocess.DEVNULL, cwd=BENCH_DIR
        )
        try:
            returncode = process.wait(timeout=timeout_s)
            status = "exited" if returncode >= 0 else "killed"
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
            status = "timeout"
        wall_s = time.perf_counter() - start
        out_file.seek(0)
        err_file.seek(0)
        stdout = out_file.read().decode(errors="replace")
        stderr = err_file.read().decode(errors="replace")
    return ChildOutcome(status, returncode, wall_s, _last_result(stdout), stderr[-2000:])


def _last_result(stdout: str) -> dict[str, Any]:
    """The last ``RESULT_MARKER`` JSON line in a child's stdout ({} if none)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER) :])
            except json.JSONDecodeError:
                continue
    return {}


def outcome_error(outcome: ChildOutcome, timeout_s: float, mem_gb: float | None) -> str | None:
    """A short reason a child did not finish normally (None if it did)."""
    if outcome.status == "timeout":
        return f"timeout after {timeout_s:.0f} s"
    if outcome.status == "killed":
        signal = -outcome.returncode
        hint = f" (out of memory? cap {mem_gb} GiB)" if signal == 9 else ""
        return f"killed by signal {signal}{hint}"
    if outcome.returncode != 0:
        lines = [line for line in outcome.stderr_tail.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else ""
        return f"exit code {outcome.returncode}: {last[:200]}"
    return None


def total_memory_gb() -> float:
    """Physical memory of this machine in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def default_memory_cap_gb(jobs: int) -> float:
    """Address-space cap per child so that ``jobs`` children fit in this machine.

    Address space over-counts resident memory (importing torch alone maps ~3.5 GiB),
    so the cap is generous: 80 % of physical memory shared among the jobs, at most 16.
    """
    return round(min(16.0, 0.8 * total_memory_gb() / max(1, jobs)), 1)


# ----------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(extra_packages: Iterable[str] = ()) -> dict[str, str]:
    """Machine and library versions, for the header of a results file."""
    import torch
    import torchvision

    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "memory": f"{total_memory_gb():.1f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "load average (1/5/15 min) at start": load_average(),
    }
    for package in extra_packages:
        info[package] = package_version(package)
    return info


def load_average() -> str:
    """The 1/5/15-minute load averages; other work on the machine skews timings."""
    try:
        return "/".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


def package_version(package: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def header_lines(info: dict[str, str]) -> list[str]:
    """Markdown bullet lines for a machine-info dict."""
    return [f"- {key}: {value}" for key, value in info.items()]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table; ``|`` inside cells is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def fmt(value: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals, or ``-`` for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the non-None values, or None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def max_or_none(values: Iterable[float | None]) -> float | None:
    """Maximum of the non-None values, or None if there are none."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0.0 for one value); (None, None) if empty."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def paired_t(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[float, float, int] | None:
    """(mean of a - b, two-sided p of a paired t-test, pairs) over the keys both have
    (seeds: the same init and data order); None with fewer than 2 pairs. Identical gaps
    give p = 1 for a zero gap and 0 otherwise (the t statistic is undefined there)."""
    from scipy import stats

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    gaps = [a[k] - b[k] for k in keys]
    mean = sum(gaps) / len(gaps)
    if all(g == gaps[0] for g in gaps):
        return mean, (1.0 if mean == 0 else 0.0), len(keys)
    return mean, float(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue), len(keys)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp creates 0600; make it a normal file
        with os.fdopen(handle, "w") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- load


class BusyLoad:
    """``processes`` extra processes each running a pure-Python busy loop, and a sampler of
    the machine's load while they run: a context manager.

    On exit the processes are killed (by their own ids) and ``summary()`` says what ran:
    how many busy processes, the share of one CPU each actually got (from its CPU time), and
    the 1-minute load average sampled every ``sample_s`` seconds (min / median / max)."""

    def __init__(self, processes: int = 1, sample_s: float = 5.0):
        self.processes = processes
        self.sample_s = sample_s
        self.children: list[subprocess.Popen] = []
        self.loads: list[float] = []
        self.cpu_shares: list[float] = []
        self.seconds = 0.0
        self._stop = None
        self._thread = None
        self._start = 0.0

    def __enter__(self) -> BusyLoad:
        import threading

        self._start = time.perf_counter()
        for _ in range(self.processes):
            self.children.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            try:
                self.loads.append(os.getloadavg()[0])
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        ticks = os.sysconf("SC_CLK_TCK")
        for child in self.children:
            try:  # utime + stime of the child, from /proc/<pid>/stat (fields 14 and 15)
                fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
                self.cpu_shares.append((int(fields[11]) + int(fields[12])) / ticks / max(self.seconds, 1e-9))
            except (OSError, IndexError, ValueError):
                pass
            child.kill()
            child.wait()
        if self._stop is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> str:
        """One line describing the extra load and the load average seen."""
        shares = ", ".join(f"{s:.0%}" for s in self.cpu_shares) or "unknown"
        loads = (f"{min(self.loads):.2f} / {statistics.median(self.loads):.2f} / {max(self.loads):.2f}"
                 if self.loads else "not sampled")
        return (f"{self.processes} busy-loop process(es) (`python -c 'while True: pass'`) for {self.seconds:.0f} s, "
                f"CPU share each: {shares}; 1-min load average sampled every {self.sample_s:g} s "
                f"(min / median / max): {loads}")
