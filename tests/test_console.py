"""The ``onnx-dc`` entry point (onnx_dc.console): signal handling before the heavy imports, a light start."""

from __future__ import annotations

import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the console script does (``from onnx_dc.console import main; sys.exit(main())``), with a hook
# that sends the signal to the process itself when a module is imported for the first time.
_SIGNAL_ON_IMPORT = """
import builtins, os, sys
target, signum = sys.argv.pop(1), int(sys.argv.pop(1))
real_import = builtins.__import__

def hook(name, *args, **kwargs):
    if name == target and target not in sys.modules:
        os.kill(os.getpid(), signum)
    return real_import(name, *args, **kwargs)

builtins.__import__ = hook
from onnx_dc.console import main
sys.exit(main())
"""


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                          **kwargs)


def _default_signal_handlers() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_the_console_script_is_the_light_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"onnx-dc": "onnx_dc.console:main"}
    assert "from onnx_dc.console import main" in (REPO / "onnx_dc" / "__main__.py").read_text()


def test_starting_the_command_line_loads_nothing_heavy():
    code = (
        "import sys; import onnx_dc.console, onnx_dc.api.cli; onnx_dc.api.cli.build_parser(); "
        "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'tqdm') if m in sys.modules))"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["onnx_dc.api.cli", "onnx"], ids=["importing-the-cli", "importing-onnx"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_imports_is_one_line_and_exit_130(tmp_path, module, sig):
    model = REPO / "model_zoo" / "models" / "lenet_300_100.onnx"
    output = tmp_path / "out.onnx"
    result = _python("-c", _SIGNAL_ON_IMPORT, module, str(int(sig)), "compress", str(model), "-o", str(output),
                     preexec_fn=_default_signal_handlers)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr == "onnx-dc: error: interrupted; no output was written\n"
    assert list(tmp_path.iterdir()) == []


def test_python_m_onnx_dc_is_the_same_command():
    via_module = _python("-m", "onnx_dc", "--version")
    via_console = _python("-c", "import sys; from onnx_dc.console import main; sys.exit(main())", "--version")
    assert via_module.returncode == via_console.returncode == 0
    assert via_module.stdout == via_console.stdout and via_module.stdout.startswith("onnx-dc ")


def test_a_signal_the_parent_ignores_stays_ignored():
    from onnx_dc.console import install_signal_handlers

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a background job
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        install_signal_handlers()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
