"""Tests for onnx_dc.api.cli: the four subcommands, exit codes, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graph_builders as gb
from onnx_dc.api.cli import EXIT_INTERRUPTED, EXIT_THRESHOLD, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnx_dc", *args], capture_output=True, text=True, env=_env(), timeout=300, **kwargs
    )


@pytest.fixture()
def mlp_file(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(gb.mlp(), path)
    return path


def test_compress_inspect_validate_decompress(tmp_path, mlp_file, capsys):
    out = tmp_path / "mlp.dc.onnx"
    assert main(["compress", str(mlp_file), "-o", str(out), "--sparsity", "fc=0.8", "--bits", "fc=5,b1=6"]) == 0
    table = capsys.readouterr().out
    assert "total (every weight)" in table and "file size" in table and f"wrote {out}" in table
    onnx.checker.check_model(str(out), full_check=True)

    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"original_bytes", "compressed_bytes", "ratio", "tensors"} <= set(report)
    names = {t["name"]: t for t in report["tensors"]}
    assert set(names) == {"w1", "b1", "w2", "w3"}
    assert names["b1"]["bits"] == 6 and names["w1"]["bits"] == 5
    assert abs(names["w1"]["kept_fraction"] - 0.2) < 0.01
    assert report["compressed_file_bytes"] == out.stat().st_size
    assert main(["inspect", str(out)]) == 0
    assert "w1" in capsys.readouterr().out

    assert main(["validate", str(mlp_file), str(out), "--json", "--min-cosine", "0.5", "--no-library"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["outputs"][0]["name"] == "y" and not result["used_library"]
    assert main(["validate", str(mlp_file), str(out), "--max-abs-diff", "0", "--no-library"]) == EXIT_THRESHOLD
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAILED")

    restored = tmp_path / "mlp.restored.onnx"
    assert main(["decompress", str(out), "-o", str(restored)]) == 0
    model = onnx.load(restored)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in gb.mlp().graph.node]


def test_validate_with_npz_inputs(tmp_path, mlp_file, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(mlp_file), "-o", str(out), "--no-progress"]) == 0
    np.savez(tmp_path / "in.npz", x=gb.inputs_for(gb.mlp(), batch=7)["x"])
    capsys.readouterr()
    argv = ["validate", str(mlp_file), str(out), "--inputs", str(tmp_path / "in.npz"), "--json", "--no-library"]
    # The test MLP's random weights keep a cosine of about 0.98 at the default settings: below the default 0.99.
    assert main([*argv, "--min-cosine", "0.9"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"][0]["shape"] == [7, 10]
    assert report["thresholds"]["applied"] == ["cosine >= 0.9", "top-1 agreement >= 95% (default)"]
    assert main(argv) == EXIT_THRESHOLD
    assert json.loads(capsys.readouterr().out)["thresholds"]["defaults"] == ["min_cosine", "min_top1_agreement"]


def test_validate_fails_a_model_that_lost_its_weights_by_default(tmp_path, mlp_file, capsys):
    """An all-zero model (what --sparsity 1 wrote) must not pass validate without thresholds given."""
    zeroed = onnx.load(mlp_file)
    for tensor in zeroed.graph.initializer:
        tensor.CopyFrom(nh.from_array(np.zeros_like(nh.to_array(tensor)), tensor.name))
    onnx.save(zeroed, tmp_path / "zero.onnx")
    assert main(["validate", str(mlp_file), str(tmp_path / "zero.onnx")]) == EXIT_THRESHOLD
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "FAILED (cosine >= 0.99 (default))"
    assert any(line.startswith("note: top-1 agreement not checked") for line in lines)
    np.savez(tmp_path / "in.npz", x=gb.inputs_for(gb.mlp(), batch=32)["x"])
    argv = ["validate", str(mlp_file), str(tmp_path / "zero.onnx"), "--inputs", str(tmp_path / "in.npz")]
    assert main([*argv, "--min-cosine", "none"]) == EXIT_THRESHOLD
    assert capsys.readouterr().out.splitlines()[-1] == "FAILED (top-1 agreement >= 95% (default))"
    assert main([*argv, "--min-cosine", "none", "--min-top1-agreement", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "PASSED (no thresholds: outputs finite and shaped alike)"


def test_help_shows_the_defaults_and_describes_every_argument(capsys):
    from onnx_dc.api.cli import build_parser

    for command in ("compress", "decompress", "inspect", "validate", "sensitivity"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        for action in parser._actions:
            assert action.help, (command, action.dest)  # every positional and option is described
        if command == "compress":
            assert "(default fc=0.3, conv=0.1, other=none; in a transformer fc=none, other=none)" in text
            assert "(default fc=5, conv=8, other=8; in a transformer fc=5, other=5)" in text
            assert "(default 256)" in text and "0 <= S < 1" in text
        if command == "validate":
            assert "default 0.99" in text and "default 0.95 with --inputs" in text


def _mistakes(tmp_path: Path, mlp_file: Path) -> list[tuple[list[str], str]]:
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    out = str(tmp_path / "out.onnx")
    m = str(mlp_file)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=gb.inputs_for(gb.mlp(), batch=16)["x"])
    return [
        (["compress", str(tmp_path / "missing.onnx"), "-o", out], "no such file"),
        (["compress", str(text), "-o", out], "not an ONNX model"),
        (["compress", m, "-o", m], "same file as the input"),
        (["compress", m, "-o", out, "--init", "foo"], "unknown initialisation"),
        (["compress", m, "-o", out, "--colour", "red"], "unrecognized arguments"),
        (["compress", m, "-o", out, "--bits", "enc*=6"], "matches no floating-point weight"),
        (["compress", m, "-o", out, "--exclude", "enc*"], "matches no floating-point weight"),
        (["compress", m, "-o", out, "--bits", "9"], "out of range"),
        (["compress", m, "-o", out, "--sparsity", "fc=abc"], "not a number"),
        (["compress", m, "-o", out, "--sparsity", "1"], "sparsity 1 removes every weight"),
        (["compress", m, "-o", out, "--min-elements", "-1"], "out of range"),
        (["compress", m], "required"),
        (["compress", m, "-o", str(tmp_path / "nodir" / "out.onnx")], "does not exist"),
        (["decompress", str(tmp_path / "missing.onnx"), "-o", out], "no such file"),
        (["inspect", str(text)], "not an ONNX model"),
        (["inspect", m], "mlp.onnx holds no onnx-dc containers: it is not a compressed model"),
        (["validate", m, m, "--inputs", str(tmp_path / "missing.npz")], "no such inputs file"),
        (["validate", m, m, "--inputs", str(text)], "notes.onnx: not an .npz file of arrays"),
        (["compress", m, "-o", out, "--calib", str(text)], "notes.onnx: not an .npz file of arrays"),
        (["compress", m, "-o", out, "--calib", str(calib), "--eval", str(text), "--max-drop", "1"],
         "notes.onnx: not an .npz file of arrays"),
        (["validate", m, m, "--max-abs-diff", "abc"], "invalid threshold"),
        (["validate", m, m, "--min-top1-agreement", "95"], "fraction between 0 and 1"),
        (["frobnicate"], "invalid choice"),
        ([], "missing command"),
    ]


def test_user_mistakes_give_one_line_and_exit_code_2(tmp_path, mlp_file, capsys):
    for argv, message in _mistakes(tmp_path, mlp_file):
        before = sorted(os.listdir(tmp_path))
        assert main(argv) == EXIT_USAGE, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnx-dc: error: "), (argv, captured.err)
        assert message in lines[0], (argv, lines[0])
        assert captured.out == ""
        assert sorted(os.listdir(tmp_path)) == before, argv  # no output, no temporary file


def test_user_mistakes_through_the_real_command(tmp_path, mlp_file):
    """The same through ``python -m onnx_dc``: exit code 2, one stderr line, no traceback."""
    for argv, message in _mistakes(tmp_path, mlp_file)[:4]:
        result = _run(*argv)
        assert result.returncode == EXIT_USAGE
        assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_progress_off_a_terminal_is_one_line_per_stage(tmp_path, mlp_file):
    out = tmp_path / "c.onnx"
    result = _run("compress", str(mlp_file), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["onnx-dc: compressing 3 tensors"]  # w1, w2, w3: not one line each
    assert _run("compress", str(mlp_file), "-o", str(out), "--no-progress").stderr == ""
    np.savez(tmp_path / "calib.npz", x=gb.inputs_for(gb.mlp(), batch=64)["x"])
    result = _run("compress", str(mlp_file), "-o", str(out), "--calib", str(tmp_path / "calib.npz"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["onnx-dc: fitting 3 layer(s) to 64 calibration samples, one after the other",
                                          "onnx-dc: compressing 3 tensors"]


def test_progress_on_a_terminal_is_a_bar_per_tensor(tmp_path, mlp_file):
    import fcntl
    import pty
    import struct
    import termios

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        process = subprocess.Popen([sys.executable, "-m", "onnx_dc", "compress", str(mlp_file), "-o", str(tmp_path / "c.onnx")],
                                   stdout=subprocess.PIPE, stderr=terminal, env=_env())
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed: the command has finished
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=300) == 0
    finally:
        os.close(master)
    text = shown.decode("utf-8", "replace")
    assert "compressing:" in text and "onnx-dc: compressing" not in text
    for name in ("w1", "w2", "w3"):  # the bar names each tensor as it gets to it
        assert f", {name}]" in text, text


def test_a_tensor_that_keeps_no_weights_is_a_warning(tmp_path, mlp_file, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(mlp_file), "-o", str(out), "--quality", "w3=100", "--json"]) == 0
    captured = capsys.readouterr()
    expected = "tensor 'w3' keeps no weights (--quality w3=100.0): it is all zeros now"
    assert f"onnx-dc: warning: {expected}" in captured.err.splitlines()
    assert expected in json.loads(captured.out)["notes"]
    assert main(["compress", str(mlp_file), "-o", str(out), "--quality", "w3=0.5"]) == 0
    assert "keeps no weights" not in capsys.readouterr().err


def test_compressing_a_compressed_model_is_refused(tmp_path, mlp_file, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(mlp_file), "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    size = out.stat().st_size
    assert main(["compress", str(out), "-o", str(tmp_path / "again.onnx")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already compressed by onnx-dc" in err and "onnx-dc decompress" in err
    assert not (tmp_path / "again.onnx").exists() and out.stat().st_size == size


def test_corrupted_compressed_model_is_one_line(tmp_path, mlp_file, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(mlp_file), "-o", str(out)]) == 0
    model = onnx.load(out)
    t = next(t for t in model.graph.initializer if t.name == "w1__dc")
    t.raw_data = t.raw_data[:-7]
    onnx.save(model, tmp_path / "bad.onnx")
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "d.onnx")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "w1__dc" in err
    assert not (tmp_path / "d.onnx").exists()
    assert main(["inspect", str(tmp_path / "bad.onnx")]) == EXIT_USAGE
    capsys.readouterr()
    # Through the operator library: session creation fails; still one line (onnxruntime's log silenced).
    for extra in ([], ["--no-library"]):
        result = _run("validate", str(mlp_file), str(tmp_path / "bad.onnx"), *extra)
        assert result.returncode == EXIT_USAGE
        assert result.stderr.count("\n") == 1 and "w1__dc" in result.stderr, result.stderr


def _big_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(6):
        inits.append(nh.from_array(rng.standard_normal((1024, 1024)).astype(np.float32), f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, [1, 1024])], [h.make_tensor_value_info(prev, T.FLOAT, [1, 1024])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)


@pytest.mark.slow  # the full suite only: three runs of a 24 MiB compression, signalled at set times
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_output(tmp_path, signum):
    """Whenever the signal lands, the output is either complete or absent, and no temporary file remains."""
    src = tmp_path / "big.onnx"
    _big_model(src)
    out = tmp_path / "big.dc.onnx"
    for delay in (1.0, 2.5, 5.0):
        process = subprocess.Popen(
            [sys.executable, "-m", "onnx_dc", "compress", str(src), "-o", str(out), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        time.sleep(delay)
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        # A signal during Python's start-up or shutdown may end the process by its default action.
        assert process.returncode in (0, EXIT_INTERRUPTED, -signum), err
        if process.returncode == EXIT_INTERRUPTED:
            if out.exists():  # the signal came after the atomic rename
                assert err.strip() == f"onnx-dc: error: interrupted after {out} was written completely"
            else:
                assert err.strip() == "onnx-dc: error: interrupted; no output was written"
        if out.exists():  # finished before the signal: complete and valid
            onnx.checker.check_model(str(out), full_check=True)
            out.unlink()


@pytest.mark.slow  # the full suite only: both zoo models through every command and the evaluation
@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_zoo_models_from_the_command_line(name, tmp_path):
    """compress -> validate -> decompress -> evaluate, each as a command, on the committed zoo model."""
    from model_zoo import get_model_path

    src = get_model_path(name)
    compressed, restored = tmp_path / "c.onnx", tmp_path / "d.onnx"
    result = _run("compress", str(src), "-o", str(compressed))
    assert result.returncode == 0, result.stderr
    assert "total (every weight)" in result.stdout
    result = _run("validate", str(src), str(compressed), "--min-cosine", "0.9", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["used_library"]
    assert _run("decompress", str(compressed), "-o", str(restored)).returncode == 0
    accuracies = {}
    for path, flag in ((src, "--no-custom-ops"), (compressed, "--custom-ops"), (restored, "--no-custom-ops")):
        run = subprocess.run(
            [sys.executable, "-m", "model_zoo.evaluate", str(path), flag, "--json"],
            capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO,
        )
        assert run.returncode == 0, run.stderr
        accuracies[path.name] = json.loads(run.stdout)["accuracy"]
    assert abs(accuracies["c.onnx"] - accuracies["d.onnx"]) <= 2e-4
    assert accuracies["c.onnx"] >= accuracies[src.name] - 0.015
