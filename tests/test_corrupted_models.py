"""Corrupted containers inside compressed models, end to end.

Every container of a compressed model (the zoo's models and small conv,
embedding, If-subgraph, Constant-node and float16 models, so DCMatMul and
the DCDecompress operators read them from initializers, outer scopes and
Constant nodes) is flipped, truncated and extended. Then

* onnxruntime session creation with the operator library fails with an
  onnxruntime error that names the container and the problem (a FORMAT.md
  section 7 keyword). The sessions are created in a child Python process that
  announces each case before trying it: the test proves the child survives
  every case (a crash would kill it, not pytest) and knows which case killed it.
  Mutants with a recomputed CRC (corruption by someone who knows the format) must
  either be refused the same way or give a session that runs.
* ``onnx-dc decompress``, ``validate`` and ``inspect`` exit with code 2 and
  print exactly one line naming the container; ``decompress`` leaves no output
  file and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "fuzz"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import fuzz_support  # noqa: E402
import graph_builders  # noqa: E402

import onnx_dc  # noqa: E402
from onnx_dc.api.recipe import Recipe  # noqa: E402
from onnx_dc.graph.model_io import iter_graphs  # noqa: E402

DOMAIN = "ai.onnx_dc"
KEYWORDS = [k.lower() for k in fuzz_support.format_keywords()]


# ---------------------------------------------------------------------------- models
def _container_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The tensors read as containers by an ai.onnx_dc node, by name: initializers of any graph
    (also outer-scope ones used inside If/Loop/Scan bodies) and values of Constant nodes."""
    tensors: dict[str, onnx.TensorProto] = {}
    for graph in iter_graphs(model.graph):
        tensors.update({t.name: t for t in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        tensors[node.output[0]] = attr.t
    used: dict[str, onnx.TensorProto] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.domain == DOMAIN:
                name = node.input[1 if node.op_type == "DCMatMul" else 0]
                if name in tensors:
                    used[name] = tensors[name]
    return used


def _container_names(model: onnx.ModelProto) -> list[str]:
    return sorted(_container_tensors(model))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, list[str]]]:
    """name -> (original path, compressed path, container names); inputs for ``validate`` in <original>.npz."""
    directory = tmp_path_factory.mktemp("corrupted")
    sources = {p.stem: p for p in sorted((REPO_ROOT / "model_zoo" / "models").glob("*.onnx"))}
    for name in ("convnet", "embedding", "if_model", "constant_weights", "float16_mlp"):
        path = directory / f"{name}.onnx"
        onnx.save(graph_builders.ALL_BUILDERS[name](), str(path))
        sources[name] = path
    result = {}
    for name, original in sources.items():
        compressed = directory / f"{name}.dc.onnx"
        onnx_dc.compress(original, compressed, Recipe(min_elements=64))
        names = _container_names(onnx.load(str(compressed)))
        assert names, f"{name}: no container in the compressed model"
        np.savez(directory / f"{name}.npz", **graph_builders.inputs_for(onnx.load(str(original))))
        result[name] = (original, compressed, names)
    assert "lenet_300_100" in result
    ops = {n.op_type for _, path, _ in result.values() for g in iter_graphs(onnx.load(str(path)).graph) for n in g.node}
    assert {"DCMatMul", "DCDecompress", "DCDecompressFloat16"} <= ops, ops
    return result


# ---------------------------------------------------------------------------- mutations
def _mutations(size: int, rng: np.random.Generator) -> list[dict]:
    """Flips, truncations and extensions of a container of ``size`` bytes (as JSON-able recipes)."""
    recipes: list[dict] = []
    positions = sorted({0, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 23, 24, size // 2, size - 5, size - 1}
                       | {int(p) for p in rng.integers(0, size, 6)})
    for position in positions:
        recipes.append({"kind": "flip", "position": position, "bit": int(rng.integers(0, 8))})
    for length in sorted({0, 1, 27, 28, 29, 100, size // 2, size - 4, size - 1}):
        if length < size:
            recipes.append({"kind": "truncate", "length": length})
    for extra in (1, 4, 1000):
        recipes.append({"kind": "extend", "bytes": extra, "seed": int(rng.integers(0, 1 << 30))})
    recipes.append({"kind": "extend", "bytes": size, "seed": -1})  # the container twice
    for position in rng.integers(24, size - 4, 12):  # adversarial: CRC recomputed after the flip
        recipes.append({"kind": "flip", "position": int(position), "bit": int(rng.integers(0, 8)), "fix_crc": True})
    return recipes


def apply_mutation(data: bytes, recipe: dict) -> bytes:
    """The container ``data`` corrupted as ``recipe`` says."""
    out = bytearray(data)
    if recipe["kind"] == "flip":
        out[recipe["position"]] ^= 1 << recipe["bit"]
    elif recipe["kind"] == "truncate":
        del out[recipe["length"]:]
    elif recipe["seed"] < 0:
        out += data
    else:
        out += np.random.default_rng(recipe["seed"]).integers(0, 256, recipe["bytes"], dtype=np.uint8).tobytes()
    if recipe.get("fix_crc") and len(out) >= 28:
        out[-4:] = zlib.crc32(bytes(out[:-4])).to_bytes(4, "little")
    return bytes(out)


def corrupted_model(model: onnx.ModelProto, container: str, recipe: dict) -> onnx.ModelProto:
    """A copy of ``model`` whose container ``container`` is mutated (its 1-D shape follows the new size)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensor = _container_tensors(out)[container]
    data = apply_mutation(onnx.numpy_helper.to_array(tensor).tobytes(), recipe)
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.frombuffer(data, dtype=np.uint8).copy(), tensor.name))
    return out


# The child: creates a session for every case, printing "try" before and the outcome after each.
_SESSION_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnx, onnxruntime as ort
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import onnx_dc
    from test_corrupted_models import corrupted_model
    import graph_builders
    library = onnx_dc.ops_library_path()
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        model = onnx.load(job["model"])
        feeds = graph_builders.inputs_for(model)
        for case in job["cases"]:
            print(json.dumps({{"try": case["id"]}}), flush=True)
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.register_custom_ops_library(library)
            bad = corrupted_model(model, case["container"], case["recipe"]).SerializeToString()
            try:
                session = ort.InferenceSession(bad, options, providers=["CPUExecutionProvider"])
            except Exception as error:
                result = {{"refused": True, "type": type(error).__module__ + "." + type(error).__name__,
                          "message": str(error)}}
            else:
                outputs = session.run(None, feeds)
                result = {{"refused": False, "finite_outputs": all(bool(np.isfinite(o).all()) for o in outputs)}}
            result["id"] = case["id"]
            print(json.dumps(result), flush=True)
    print(json.dumps({{"done": True}}), flush=True)
    """
)


@pytest.mark.slow  # the full suite only: a session per corrupted container
def test_session_creation_refuses_every_corrupted_container(models: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(2024)
    jobs, cases_by_id = [], {}
    for name, (_, compressed, containers) in models.items():
        model = onnx.load(str(compressed))
        sizes = {n: onnx.numpy_helper.to_array(t).size for n, t in _container_tensors(model).items()}
        cases = []
        for container in containers:
            for recipe in _mutations(sizes[container], rng):
                case = {"id": len(cases_by_id), "container": container, "recipe": recipe}
                cases_by_id[case["id"]] = (name, case)
                cases.append(case)
        jobs.append({"model": str(compressed), "cases": cases})
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    script = _SESSION_CHILD.format(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"))
    child = subprocess.run([sys.executable, "-c", script, str(jobs_file)], capture_output=True, text=True,
                           timeout=1200, check=False)
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    tried = [line["try"] for line in lines if "try" in line]
    if child.returncode != 0 or not lines or not lines[-1].get("done"):
        last = cases_by_id[tried[-1]] if tried else None
        pytest.fail(f"the session child died (exit {child.returncode}) on {last}:\n{child.stderr[-3000:]}")
    results = {line["id"]: line for line in lines if "id" in line}
    assert sorted(results) == sorted(cases_by_id)
    refused_with_crc_fixed = 0
    for case_id, result in results.items():
        name, case = cases_by_id[case_id]
        label = f"{name}/{case['container']} {case['recipe']}"
        if not case["recipe"].get("fix_crc"):
            assert result["refused"], f"{label}: the corrupted container was accepted"
        if result["refused"]:
            message = result["message"]
            assert result["type"].startswith("onnxruntime."), f"{label}: {result['type']}"
            assert f"container '{case['container']}'" in message, f"{label}: {message}"
            assert any(k in message.lower() for k in KEYWORDS), f"{label}: {message}"
            refused_with_crc_fixed += bool(case["recipe"].get("fix_crc"))
        else:
            assert result["finite_outputs"] is not None
    # Most adversarial flips still break some rule (a flipped codebook bit may stay valid).
    assert refused_with_crc_fixed > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_dc", *args], capture_output=True, text=True, timeout=300,
                          check=False, cwd=str(REPO_ROOT))


def _cli_cases(models: dict) -> list[tuple[str, str, dict]]:
    """(model name, container, recipe): every container flipped, truncated and extended, spread over the models."""
    kinds = [{"kind": "flip", "position": 40, "bit": 3}, {"kind": "truncate", "length": 50},
             {"kind": "extend", "bytes": 16, "seed": 5}]
    cases = []
    for name, (_, _, containers) in models.items():
        for i, container in enumerate(containers):
            chosen = kinds if name == "lenet_300_100" else [kinds[i % len(kinds)]]
            cases += [(name, container, recipe) for recipe in chosen]
    return cases


def _assert_one_line_error(result: subprocess.CompletedProcess, container: str, label: str) -> None:
    assert result.returncode == 2, f"{label}: exit {result.returncode}\n{result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-dc: error: "), f"{label}: {result.stderr[-2000:]}"
    assert container in lines[0] and any(k in lines[0].lower() for k in KEYWORDS), f"{label}: {lines[0]}"
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # the full suite only: every corrupted container through four commands
def test_cli_refuses_corrupted_models_with_one_line_and_exit_2(models: dict, tmp_path: Path) -> None:
    cases = _cli_cases(models)

    def run(index: int) -> None:
        name, container, recipe = cases[index]
        original, compressed, _ = models[name]
        work = tmp_path / f"case{index}"
        work.mkdir()
        bad = work / "bad.onnx"
        onnx.save(corrupted_model(onnx.load(str(compressed)), container, recipe), str(bad))
        label = f"{name}/{container} {recipe}"
        output = work / "out.onnx"
        _assert_one_line_error(_cli("decompress", str(bad), "-o", str(output)), container, f"decompress {label}")
        assert sorted(p.name for p in work.iterdir()) == ["bad.onnx"], f"{label}: left {list(work.iterdir())}"
        inputs = ("--inputs", str(compressed.parent / f"{name}.npz"))
        _assert_one_line_error(_cli("validate", str(original), str(bad), *inputs), container, f"validate {label}")
        if recipe["kind"] == "flip":
            _assert_one_line_error(_cli("validate", str(original), str(bad), "--no-library", *inputs), container,
                                   f"validate --no-library {label}")
            _assert_one_line_error(_cli("inspect", str(bad)), container, f"inspect {label}")

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(run, range(len(cases))))
