"""Large models: compression speed, converter memory and session memory of synthetic MatMul stacks.

    python benchmarks/bench_scale.py                       # 0.13, 1 and 4.4 GB, default settings and --jobs 1, 3 repeats
    python benchmarks/bench_scale.py --models 0.13GB --calib --repeats 1
    python benchmarks/bench_scale.py --cache DIR           # where the seeded models are written (default ~/.cache/onnx-dc/scale)

The models are benchmarks/scale_models.py's (generated on first use, seeded, cached): 8 x 2048 x 2048 (the issue's
0.13 GB model), 16 x 4096 x 4096 (1.07 GB, inline), and 16 x 8192 x 8192 plus an 8192 x 3072 head (1.10 B
weights, 4.40 GB, external data). Every run is ``python -m onnx_dc compress`` in a child process of its own
process group, measured from outside:

* wall time, and weights per second (the model's weights / wall time);
* CPU time of every process of the group (the converter, the forkserver, the workers), read from /proc every
  0.25 s; cores used = CPU time / wall time; weights per CPU-second = the model's weights / CPU time (what the
  rate would be per fully available core, whatever else the machine is doing);
* converter memory: the peak, over the samples, of the group's summed resident memory (RSS; the workers' file
  pages of the memory-mapped input count as theirs), and the largest single process's peak (``VmHWM``);
* session memory: in a fresh child process, the resident memory an onnxruntime session adds (created from the
  file, one batch-1 run; the compressed model through the operator library), against the float model's.

Runs of the same model alternate between the variants (default settings with all cores, ``--jobs 1``) so that
other load on the machine hits them alike; each cell is the median of ``--repeats`` runs, and the load averages
seen are printed. Ratios are computed from the medians. ``--calib`` adds runs with a few calibration samples
(``--calib --calib-samples 8``), ``--session`` / ``--no-session`` switches the session measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.scale_models import SCALE_MODELS, StackSpec, write_matmul_stack  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SAMPLE_SECONDS = 0.25


@dataclass
class RunResult:
    """One converter run measured from outside."""

    wall: float
    cpu: float
    peak_group_rss: int
    peak_process_hwm: int
    output_bytes: int
    load: tuple[float, float]
    returncode: int
    stderr: str = ""


@dataclass
class Row:
    model: StackSpec
    variant: str
    runs: list[RunResult] = field(default_factory=list)
    session: int | None = None
    float_session: int | None = None


def _proc_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _cpu_and_rss(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, resident bytes, peak resident bytes) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = hwm = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, rss, hwm


def measure(command: list[str], output: Path) -> RunResult:
    """Run ``command`` in its own process group; sample the group's CPU and memory until it exits."""
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    cpu: dict[int, float] = {}
    peak = {"group": 0, "hwm": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for pid in _proc_group(process.pid):
                measured = _cpu_and_rss(pid)
                if measured is None:
                    continue
                cpu[pid] = max(cpu.get(pid, 0.0), measured[0])
                total += measured[1]
                peak["hwm"] = max(peak["hwm"], measured[2])
            peak["group"] = max(peak["group"], total)
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    size = output.stat().st_size if output.exists() else 0
    data = output.with_name(output.name + ".data")
    size += data.stat().st_size if data.exists() else 0
    return RunResult(wall, sum(cpu.values()), peak["group"], peak["hwm"], size, (load_before, os.getloadavg()[0]),
                     process.returncode, stderr)


_SESSION_CHILD = r"""
import os, sys
import numpy as np
import onnxruntime as ort

def resident():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

path, library, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = ort.SessionOptions()
options.log_severity_level = 3
options.intra_op_num_threads = 2
if library != "-":
    options.register_custom_ops_library(library)
before = resident()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
session.run(None, {"x": x})
after = resident()
print(after - before)
"""


def session_memory(path: Path, library: str | None, width: int) -> int:
    """Resident bytes an onnxruntime session on ``path`` adds, in a fresh process (created, run once)."""
    result = subprocess.run([sys.executable, "-c", _SESSION_CHILD, str(path), library or "-", str(width)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"session on {path} failed: {result.stderr.strip()[-500:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return format(values[0], fmt) if values else "-"
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(s.name.removeprefix("stack-") for s in SCALE_MODELS),
                        help="comma-separated: 0.13GB, 1GB, 4.4GB")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "onnx-dc" / "scale"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib", action="store_true", help="also with --calib (8 samples)")
    parser.add_argument("--no-jobs-1", action="store_true", help="skip the --jobs 1 runs")
    parser.add_argument("--no-session", action="store_true", help="skip the session memory measurement")
    parser.add_argument("--keep-models", action="store_true", help="keep the generated models in --cache")
    args = parser.parse_args(argv)

    import onnx_dc

    library = str(onnx_dc.ops_library_path())
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.models.split(",") if s.strip()]
    specs = [s for s in SCALE_MODELS if s.name.removeprefix("stack-") in wanted]
    rows: list[Row] = []
    print(f"machine: {os.cpu_count()} vCPUs, onnx-dc {onnx_dc.__version__}, {args.repeats} repeat(s)", flush=True)
    for spec in specs:
        source = cache / f"{spec.name}.onnx"
        if not source.exists():
            print(f"writing {source} ({spec.nbytes / 1e9:.2f} GB)...", flush=True)
            write_matmul_stack(spec, source)
        variants = {"default": []}
        if not args.no_jobs_1:
            variants["--jobs 1"] = ["--jobs", "1"]
        work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=cache))
        if args.calib:
            calib = work / "calib.npz"
            np.savez(calib, x=np.random.default_rng(0).standard_normal((8, spec.widths[0])).astype(np.float32))
            variants["--calib"] = ["--calib", str(calib), "--calib-samples", "8"]
        spec_rows = {name: Row(spec, name) for name in variants}
        output = work / "out.onnx"  # the default run's; the others write beside it
        for repeat in range(args.repeats):
            for name, extra in variants.items():
                target = output if name == "default" else work / "other.onnx"
                command = [sys.executable, "-m", "onnx_dc", "compress", str(source), "-o", str(target),
                           "--no-progress", *extra]
                result = measure(command, target)
                if result.returncode != 0:
                    print(f"{spec.name} {name}: exit {result.returncode}: {result.stderr.strip()[-400:]}", flush=True)
                spec_rows[name].runs.append(result)
                print(f"{spec.name} {name} run {repeat + 1}: {result.wall:.1f} s, {spec.n_weights / result.wall / 1e6:.2f} "
                      f"M weights/s, cores {result.cpu / result.wall:.2f}, peak {_mb(result.peak_group_rss)} "
                      f"(largest process {_mb(result.peak_process_hwm)}), load {result.load[0]:.1f}/{result.load[1]:.1f}",
                      flush=True)
                if not (repeat == args.repeats - 1 and name == "default") or args.no_session:
                    _remove(target)
        if not args.no_session and output.exists():
            spec_rows["default"].session = session_memory(output, library, spec.widths[0])
            spec_rows["default"].float_session = session_memory(source, None, spec.widths[0])
            print(f"{spec.name} sessions: compressed {_mb(spec_rows['default'].session)}, "
                  f"float {_mb(spec_rows['default'].float_session)}", flush=True)
        _remove(output)
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
        if not args.keep_models:
            _remove(source)
        rows.extend(spec_rows.values())
    print()
    print(format_table(rows))
    return 0


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def format_table(rows: list[Row]) -> str:
    """The markdown table of the results (medians, with the range over the repeats)."""
    header = ["model", "weights", "settings", "wall s", "M weights/s", "cores used", "M weights per CPU-s",
              "converter peak (all processes)", "largest process", "output", "session (compressed / float)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_model: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_model.setdefault(row.model.name, {})[row.variant] = row
        runs = [r for r in row.runs if r.returncode == 0]
        if not runs:
            lines.append(f"| {row.model.name} | {row.model.n_weights / 1e6:,.1f} M | {row.variant} | failed | | | | | | | |")
            continue
        walls = [r.wall for r in runs]
        rates = [row.model.n_weights / r.wall / 1e6 for r in runs]
        cores = [r.cpu / r.wall for r in runs]
        session = "-"
        if row.session is not None and row.float_session:
            session = f"{_mb(row.session)} / {_mb(row.float_session)} = 1/{row.float_session / row.session:.1f}"
        lines.append(
            f"| {row.model.name} ({row.model.nbytes / 1e9:.2f} GB{', external data' if row.model.external else ''}) "
            f"| {row.model.n_weights / 1e6:,.1f} M | {row.variant} | {_spread(walls, '.1f')} | {_spread(rates, '.2f')} "
            f"| {_median(cores):.2f} | {_median([row.model.n_weights / r.cpu / 1e6 for r in runs]):.1f} "
            f"| {_mb(_median([r.peak_group_rss for r in runs]))} "
            f"| {_mb(_median([r.peak_process_hwm for r in runs]))} | {_mb(runs[0].output_bytes)} | {session} |"
        )
    notes = []
    for name, variants in by_model.items():
        default, serial = variants.get("default"), variants.get("--jobs 1")
        if default and serial and default.runs and serial.runs:
            pairs = [s.wall / d.wall for d, s in zip(default.runs, serial.runs) if d.returncode == 0 == s.returncode]
            if pairs:
                notes.append(f"{name}: all cores vs --jobs 1: {_spread(pairs, '.2f')}x faster (per pair of runs)")
    loads = [load for row in rows for run in row.runs for load in run.load]
    if loads:
        notes.append(f"1-minute load average seen: {min(loads):.1f} to {max(loads):.1f} (median {_median(loads):.1f})")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    sys.exit(main())
