"""What the benchmark scripts share to present their measurements: the machine and its load, the summary of a list of
timings (median and spread), the warning for noisy timings, a table printed once (headers first, rows as they come),
the ``--help`` layout, stopping cleanly on Ctrl-C, and the JSON file.

Spread: the interquartile range ``p75 − p25`` of the timings of one measurement. A table cell shows it as
``median ±N%`` with ``N`` half the range as a percentage of the median (so the middle half of the timings lies within
about ``median ±N%``); :func:`noise_warnings` names every row where the whole range exceeds :data:`NOISE_THRESHOLD` of
the median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from internals import WriteError, write_text

NOISE_THRESHOLD = 0.10
"""A measurement is noisy when its interquartile range exceeds this fraction of its median."""


# ------------------------------------------------------------------------------------------------------- the machine


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes, this one's threads included), where the OS has them."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """The CPU model, core and thread counts, torch build, the load average now and, on CUDA, the GPU."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line: ``cpu: …, cores: 2, …, load average (1/5/15 min): 1.9 1.2 0.8``."""
    parts = [f"{key}: {value}" for key, value in info.items() if key != "load_average"]
    load = info.get("load_average")
    return ", ".join(parts + ([f"load average (1/5/15 min): {' '.join(map(str, load))}"] if load else []))


# ------------------------------------------------------------------------------------------------------ the numbers


def summarize(samples: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """``median``, quartiles ``p25``/``p75``, ``min``, ``max`` and count ``n`` of ``samples`` (at least one), rounded
    to ``digits`` decimals. With one sample the quartiles equal it."""
    if not samples:
        raise ValueError("summarize: no samples")
    if len(samples) > 1:
        p25, median, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        p25 = median = p75 = samples[0]
    values = {"median": median, "p25": p25, "p75": p75, "min": min(samples), "max": max(samples)}
    return {**{k: round(v, digits) for k, v in values.items()}, "n": len(samples)}


def spread(summary: Mapping[str, Any] | None) -> float | None:
    """The interquartile range as a fraction of the median; ``None`` for fewer than two samples."""
    if summary is None or summary["n"] < 2 or summary["median"] <= 0:
        return None
    return (summary["p75"] - summary["p25"]) / summary["median"]


def noise_warnings(rows: Sequence[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str],
                   threshold: float = NOISE_THRESHOLD, cores: int | None = None) -> list[str]:
    """One line per row whose ``row["timings"]`` (name → :func:`summarize` result, or ``None``) has a spread above
    ``threshold``, naming the row (``label(row)``), each noisy timing with its spread, and the load average the row
    saw (``row["load_average"]``, if any); then, if a noisy row saw a load average above ``cores`` (default: this
    machine's), a line saying what that means."""
    cores = cores or os.cpu_count() or 1
    lines, loads = [], []
    for row in rows:
        noisy = [(name, s) for name, summary in row["timings"].items()
                 if (s := spread(summary)) is not None and s > threshold]
        if noisy:
            load = row.get("load_average")
            loads.append(load or 0.0)
            lines.append(f"warning: noisy: {label(row)}" + (f" (load average {load})" if load is not None else "")
                         + ": interquartile range " + ", ".join(f"{name} {100 * s:.0f}%" for name, s in noisy)
                         + f" of the median (above {100 * threshold:.0f}%); compare its ratios with care, or rerun "
                           "with more steps on a quieter machine")
    if loads and max(loads) > cores:
        lines.append(f"note: the load average reached {max(loads)} on {cores} cores: other processes compete for them, "
                     "and a torch thread that waits for the CPU stalls the others (fewer threads suffer less)")
    return lines


def format_time(summary: Mapping[str, Any] | None, decimals: int = 3) -> str:
    """``"1.234 ±5%"``: the median and half the interquartile range in percent of it (no spread for one sample);
    ``"-"`` for no measurement."""
    if summary is None:
        return "-"
    s = spread(summary)
    return f"{summary['median']:.{decimals}f}" + ("" if s is None else f" ±{50 * s:.0f}%")


# --------------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Column:
    """A table column: its header, the cell text of a row, and the width the cell is padded to."""
    header: str
    cell: Callable[[Mapping[str, Any]], str]
    width: int = 0
    left: bool = False


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def key(name: str, fmt: str = "{}") -> Callable[[Mapping[str, Any]], str]:
    """The cell of ``row[name]`` formatted with ``fmt``, ``"-"`` when it is missing or ``None``."""
    return lambda row: "-" if row.get(name) is None else fmt.format(row[name])


class Table:
    """A table printed once: :meth:`header` first, then :meth:`row` for each row as soon as it is measured. The widths
    are fixed by the headers and the columns' widths, so rows can be printed before the next is known."""

    def __init__(self, columns: Sequence[Column], write: Callable[[str], None] = print) -> None:
        self.columns = list(columns)
        self.widths = [max(len(c.header), c.width) for c in self.columns]
        self.write = write

    def _line(self, cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if c.left else cell.rjust(w)
                         for c, cell, w in zip(self.columns, cells, self.widths)).rstrip()

    def header(self) -> None:
        self.write(self._line([c.header for c in self.columns]))
        self.write(self._line(["-" * w for w in self.widths]))

    def row(self, row: Mapping[str, Any]) -> None:
        self.write(self._line([c.cell(row) for c in self.columns]))
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------- the script


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default (lists written as on the command line; none shown for a flag or a
    ``None`` default, whose help says what happens) and the description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help or ""
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{action.help} (default: {str(default).replace('%', '%%')})"


def positive(text: str) -> int:
    """An option's ``type``: an integer of at least 1."""
    return _integer(text, 1)


def non_negative(text: str) -> int:
    """An option's ``type``: an integer of at least 0."""
    return _integer(text, 0)


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"'{text}': expected an integer of at least {least}")
    return value


MODEL_SPECS = ("an MLP's layer sizes joined by '-' (input-hidden...-classes, ReLU, no dropout), "
               "cnn:C,H,W:CHANNELS:CLASSES (nnbackprop.cnn, e.g. cnn:3,64,64:32-64-128-256:2), or FILE.py:FUNCTION, "
               "a function returning an nnbackprop model, called as 'nnbackprop train --model' calls it")
"""What a model spec may be (``harness.resolve_model``), for the benchmarks' help."""


def add_shape_options(parser: argparse.ArgumentParser, input_shape: str, num_classes: int) -> None:
    """``--input-shape`` and ``--num-classes``, which a ``FILE.py:FUNCTION`` model is built for."""
    parser.add_argument("--input-shape", type=shape_arg, default=input_shape, metavar="C,H,W",
                        help="shape of one input example of FILE.py:FUNCTION models; an MLP or CNN spec fixes its own")
    parser.add_argument("--num-classes", type=positive, default=num_classes,
                        help="number of classes of FILE.py:FUNCTION models; an MLP or CNN spec fixes its own")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default: CUDA when there is one) and ``--threads``; :func:`device_from` reads them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive, default=None,
                        help="torch.set_num_threads (default: torch's choice)")


def device_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The device of ``--device`` (a parser error if it is not there), with ``--threads`` applied."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device


def shape_arg(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` → ``(1, 28, 28)``, for an option's ``type``."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected positive sizes joined by ',', e.g. 1,28,28 or 784")
    return shape


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn Ctrl-C (SIGINT) and SIGTERM into ``KeyboardInterrupt`` inside the block, also where the process was started
    with SIGINT ignored (a background job), so a script can write what it has measured before it stops."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def write_json(path: str | Path, result: Mapping[str, Any]) -> bool:
    """Write ``result`` to ``path`` (its folder created), atomically; print where, or one line saying why not."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result, indent=2))
    except (WriteError, OSError) as error:
        print(f"error: could not write {path}: {error}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


def plot_times(path: str | Path, labels: Sequence[str], series: Mapping[str, Sequence[Mapping[str, Any] | None]],
               *, ylabel: str, title: str) -> bool:
    """Grouped bars, one group per label and one bar per series (its median, whiskers from p25 to p75; a missing
    measurement leaves a gap), on a log scale, saved to ``path``. Prints where, or one line saying why not (matplotlib
    missing, the file not writable)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    path = Path(path)
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * len(series) * width + 2.5), 4.5))
    for i, (name, summaries) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, s in enumerate(summaries) if s is not None]
        kept = [s for s in summaries if s is not None]
        medians = [s["median"] for s in kept]
        whiskers = [[s["median"] - s["p25"] for s in kept], [s["p75"] - s["median"] for s in kept]]
        axes.bar(xs, medians, width, yerr=whiskers, capsize=2, label=name)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(axis="y", which="both", alpha=0.3)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except OSError as error:
        print(f"error: could not write {path}: {error}", file=sys.stderr)
        return False
    finally:
        plt.close(figure)
    print(f"wrote {path}")
    return True
