"""The converter never loses a user's model.

* The input model (file or ``ModelProto``) is never modified by any command.
* Output is written atomically: a reader polling the output path while
  ``compress`` overwrites it only ever sees the old file or the complete new one.
* SIGINT / SIGTERM in the middle of ``compress`` (while compressing, and while
  the output is being written) leaves no partial output and no temporary file:
  exit code 130 and one line on stderr, or, if the signal came after the final
  rename, the complete output.
* A full disk (a small tmpfs mounted by the test when running as root, and a
  size-limited file via ``RLIMIT_FSIZE`` everywhere) gives one clear line, exit
  code 2, no partial file, and an existing output file is left as it was.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper

import onnx_dc

REPO_ROOT = Path(__file__).resolve().parent.parent
LENET = REPO_ROOT / "model_zoo" / "models" / "lenet_300_100.onnx"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_dc", *args], capture_output=True, text=True, timeout=600,
                          check=False, cwd=str(REPO_ROOT), **kwargs)


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    """Files in ``directory`` other than ``keep`` (partial outputs, temporary files)."""
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-dc: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 1024 x 1024 MatMul weights (32 MiB): compressing it with 8-bit codes takes seconds."""
    rng = np.random.default_rng(0)
    size, nodes, weights, previous = 1024, [], [], "x"
    for i in range(8):
        weights.append(numpy_helper.from_array((rng.standard_normal((size, size)) * 0.05).astype(np.float32), f"w{i}"))
        nodes.append(h.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        previous = f"h{i}"
    graph = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
                         [h.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", size])], weights)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- the input is never modified
def test_no_command_modifies_its_input(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(LENET.read_bytes())
    os.chmod(model, 0o644)
    compressed = tmp_path / "model.dc.onnx"
    stamp = (_sha256(model), model.stat().st_mtime_ns)
    assert _cli("compress", str(model), "-o", str(compressed), "--no-progress").returncode == 0
    compressed_stamp = (_sha256(compressed), compressed.stat().st_mtime_ns)
    assert _cli("decompress", str(compressed), "-o", str(tmp_path / "back.onnx")).returncode == 0
    assert _cli("inspect", str(compressed)).returncode == 0
    assert _cli("validate", str(model), str(compressed)).returncode == 0
    # Output equal to the input is refused, and the input survives that too.
    refused = _cli("compress", str(model), "-o", str(model))
    assert refused.returncode == 2 and "same file" in _one_line(refused.stderr)
    assert (_sha256(model), model.stat().st_mtime_ns) == stamp
    assert (_sha256(compressed), compressed.stat().st_mtime_ns) == compressed_stamp
    assert _leftovers(tmp_path, {"model.onnx", "model.dc.onnx", "back.onnx"}) == []


def test_external_data_input_is_never_modified(tmp_path: Path) -> None:
    model = onnx.load(str(LENET))
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
              size_threshold=0)
    files = [source, tmp_path / "model.onnx.data"]
    stamps = [(_sha256(p), p.stat().st_mtime_ns) for p in files]
    out = tmp_path / "out.onnx"
    assert _cli("compress", str(source), "-o", str(out), "--external-data", "--no-progress").returncode == 0
    assert _cli("decompress", str(out), "-o", str(tmp_path / "back.onnx")).returncode == 0
    # Writing over the input or its data file is refused.
    for target in ("model.onnx", "model.onnx.data"):
        clash = _cli("compress", str(source), "-o", str(tmp_path / target), "--no-progress")
        assert clash.returncode == 2 and str(source.name) in _one_line(clash.stderr)
    assert [(_sha256(p), p.stat().st_mtime_ns) for p in files] == stamps


def test_api_leaves_the_model_proto_unchanged() -> None:
    model = onnx.load(str(LENET))
    before = model.SerializeToString()
    result = onnx_dc.compress(model)
    assert model.SerializeToString() == before
    compressed_before = result.model.SerializeToString()
    onnx_dc.decompress(result.model)
    onnx_dc.inspect(result.model)
    assert result.model.SerializeToString() == compressed_before


# ---------------------------------------------------------------------------- atomic output
@pytest.mark.slow  # the full suite only: a 32 MiB compression watched by a reader
def test_readers_see_the_old_or_the_complete_new_output(big_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.onnx"
    output.write_bytes(LENET.read_bytes())
    old = _sha256(output)
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                seen.add(hashlib.sha256(output.read_bytes()).hexdigest())
            except FileNotFoundError:
                seen.add("missing")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _cli("compress", str(big_model), "-o", str(output), "--no-progress")
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr[-2000:]
    new = _sha256(output)
    assert seen <= {old, new}, f"a reader saw {len(seen - {old, new})} other states of the output"
    assert old in seen
    assert _leftovers(tmp_path, {"out.onnx"}) == []
    onnx.checker.check_model(str(output))


# ---------------------------------------------------------------------------- signals
def _interrupt(command: list[str], sig: int, trigger, directory: Path) -> subprocess.CompletedProcess:
    """Start ``command``, send ``sig`` once ``trigger(pid)`` is true, wait for the exit."""
    # A shell running this suite in the background ignores SIGINT, and the child would inherit
    # that (Python then installs no KeyboardInterrupt handler): give the child the default.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=str(REPO_ROOT), preexec_fn=_default_signal_handlers)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if trigger(process.pid):
            process.send_signal(sig)
            break
        time.sleep(0.001)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _interrupt_after_line(command: list[str], sig: int, ready: str) -> subprocess.CompletedProcess:
    """Start ``command``, send ``sig`` as soon as it prints a stderr line containing ``ready``, wait for the exit."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=str(REPO_ROOT), preexec_fn=_default_signal_handlers)
    before = []
    for line in process.stderr:  # the stage lines onnx-dc prints when stderr is not a terminal
        before.append(line)
        if ready in line:
            process.send_signal(sig)
            break
    stdout, rest = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, "".join(before) + rest)


def _default_signal_handlers() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_compressing_leaves_nothing(big_model: Path, tmp_path: Path, sig: int) -> None:
    output = tmp_path / "out.onnx"
    stamp = _sha256(big_model)
    # No --no-progress: the stage line "onnx-dc: compressing 8 tensors" says the compression has started.
    command = [sys.executable, "-m", "onnx_dc", "compress", str(big_model), "-o", str(output), "--bits", "8"]
    result = _interrupt_after_line(command, sig, "compressing 8 tensors")
    assert result.returncode == 130, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stderr.splitlines()
    assert lines == ["onnx-dc: compressing 8 tensors", "onnx-dc: error: interrupted; no output was written"], lines
    assert _leftovers(tmp_path, set()) == []
    assert _sha256(big_model) == stamp


@pytest.mark.slow  # the full suite only: up to five 32 MiB decompressions
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_writing_leaves_old_or_complete_output(big_model: Path, tmp_path: Path, sig: int) -> None:
    compressed = tmp_path / "in.dc.onnx"
    assert _cli("compress", str(big_model), "-o", str(compressed), "--no-progress").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    output = work / "out.onnx"
    output.write_bytes(b"previous contents")
    interrupted = 0
    for attempt in range(5):
        def writing(pid: int) -> bool:  # the temporary output file exists: the write has started
            return any(p.name.startswith(".out.onnx.") for p in work.iterdir())

        # decompress writes the 32 MiB dense model: the longest write of any command.
        command = [sys.executable, "-m", "onnx_dc", "decompress", str(compressed), "-o", str(output)]
        result = _interrupt(command, sig, writing, work)
        assert _leftovers(work, {"out.onnx"}) == [], f"attempt {attempt}: {result.stderr[-2000:]}"
        if output.read_bytes() == b"previous contents":
            assert result.returncode == 130, f"exit {result.returncode}: {result.stderr[-2000:]}"
            assert "no output was written" in _one_line(result.stderr)
            interrupted += 1
            break
        else:  # the signal came after the rename: the output is complete
            assert result.returncode in (0, 130), result.stderr[-2000:]
            onnx.checker.check_model(str(output))
            output.write_bytes(b"previous contents")
    assert interrupted > 0, "the signal never arrived before the output was renamed into place"


# ---------------------------------------------------------------------------- full disk
def _assert_full_disk_outcome(result: subprocess.CompletedProcess, directory: Path, keep: set[str]) -> None:
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    line = _one_line(result.stderr)
    assert "cannot write" in line and ("No space left" in line or "File too large" in line), line
    assert _leftovers(directory, keep) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs (needs root; CI runs as root). Unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE variant covers this case")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    assert mounted.returncode == 0, f"mount failed: {mounted.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow  # the full suite only: 32 MiB compressions onto a full tmpfs
@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_full_disk_gives_one_line_and_no_partial_file(small_tmpfs: Path, big_model: Path, tmp_path: Path,
                                                      command: str) -> None:
    source = big_model
    if command == "decompress":
        source = tmp_path / "in.dc.onnx"
        assert _cli("compress", str(big_model), "-o", str(source), "--no-progress").returncode == 0
    existing = small_tmpfs / "existing.onnx"
    existing.write_bytes(b"x" * 1000)
    result = _cli(command, str(source), "-o", str(small_tmpfs / "out.onnx"), *(
        ["--no-progress"] if command == "compress" else []))
    _assert_full_disk_outcome(result, small_tmpfs, {"existing.onnx"})
    # Overwriting an existing output on a full disk keeps the old file.
    result = _cli(command, str(source), "-o", str(existing), *(["--no-progress"] if command == "compress" else []))
    _assert_full_disk_outcome(result, small_tmpfs, {"existing.onnx"})
    assert existing.read_bytes() == b"x" * 1000


@pytest.mark.slow  # the full suite only: LeNet through two commands
def test_file_size_limit_gives_one_line_and_no_partial_file(tmp_path: Path) -> None:
    # LeNet decompressed is about 1 MiB; a 200 KiB file size limit makes the write fail with EFBIG.
    compressed = tmp_path / "lenet.dc.onnx"
    assert _cli("compress", str(LENET), "-o", str(compressed), "--no-progress").returncode == 0
    work = tmp_path / "work"
    work.mkdir()

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    result = _cli("decompress", str(compressed), "-o", str(work / "out.onnx"), preexec_fn=limit_file_size)
    _assert_full_disk_outcome(result, work, set())


# ---------------------------------------------------------------------------- an interrupt at every line
def _interrupt_at_line(n: int, module_file: str):
    """A trace function raising KeyboardInterrupt at the n-th line executed in ``module_file``."""
    seen = 0

    def local(frame, event, arg):  # noqa: ANN001, ANN202
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == n:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202
        return local if frame.f_code.co_filename == module_file else None

    return tracer, lambda: seen


@pytest.mark.parametrize(("external_data", "overwrite"), [(False, True), (True, False), (True, True)],
                         ids=["single-file", "external-data-new", "external-data-overwrite"])
def test_interrupt_at_any_line_of_save_model_leaves_old_or_complete_output(tmp_path: Path, external_data: bool,
                                                                           overwrite: bool) -> None:
    """A signal can arrive between any two statements: simulate one at each line save_model executes."""
    from onnx_dc.graph import model_io

    model = onnx.load(str(LENET))
    module_file = model_io.__file__
    reference = tmp_path / "reference"
    reference.mkdir()
    model_io.save_model(model, reference / "out.onnx", external_data=external_data)
    complete = {p.name: p.read_bytes() for p in reference.iterdir()}
    tracer, count = _interrupt_at_line(0, module_file)
    sys.settrace(tracer)
    try:
        model_io.save_model(model, tmp_path / "count.onnx", external_data=external_data)
    finally:
        sys.settrace(None)
    lines = count()
    assert lines > 10
    interrupted = 0
    for n in range(1, lines + 1):
        work = tmp_path / f"line{n}"
        work.mkdir()
        existing = {}
        if overwrite:
            existing = {"out.onnx": b"old model", **({"out.onnx.data": b"old data"} if external_data else {})}
        for name, data in existing.items():
            (work / name).write_bytes(data)
        tracer, _ = _interrupt_at_line(n, module_file)
        sys.settrace(tracer)
        try:
            model_io.save_model(model, work / "out.onnx", external_data=external_data)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        found = {p.name: p.read_bytes() for p in work.iterdir()}
        assert found in (existing, complete), f"an interrupt at executed line {n} left {sorted(found)}"
    assert interrupted > 0
