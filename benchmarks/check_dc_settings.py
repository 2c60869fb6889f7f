"""Check onnx-dc settings of a benchmark model on its CALIBRATION material only.

    python benchmarks/check_dc_settings.py MODEL [--try JSON]... [--fit N] [--check N]

How the settings of ``benchmarks/dc_settings.py`` were chosen, without looking at
the evaluation inputs that ``benchmarks/compare.py`` reports on:

* real models: the first ``--fit`` inputs of the ``calib`` split are the
  calibration data, the next ``--check`` inputs of the same split are the check
  data; the model's task metric (agreement with the original) is measured there;
* LeNets: ``calibration_set(--fit)`` training images are the calibration data and
  ``validation_set(--check)`` (other training images) the check data; the metric is
  top-1 accuracy there, printed with the original's.

Without ``--try`` the registered "calibrated" settings are checked; each ``--try``
is a JSON object of :class:`benchmarks.dc_settings.DcSettings` fields (e.g.
``'{"sparsity": "none", "bits": 4, "sequential": false}'``). Prints one line per
setting: file ratio, metric, cosine of the outputs, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import make_session, output_fidelity  # noqa: E402
from benchmarks.compare_cases import LENET_MODELS, REAL_MODELS  # noqa: E402
from benchmarks.dc_settings import DcSettings, settings_for  # noqa: E402


def _splits(name: str, n_fit: int, n_check: int, seed: int):
    """(model proto, calibration feeds, check feeds, metric(reference, candidate) -> float, metric name)."""
    if name in LENET_MODELS:
        from model_zoo import get_model, get_model_path
        from model_zoo.fashion_mnist import calibration_set, validation_set

        entry = get_model(name)
        fit = calibration_set(n_fit, seed=seed)
        check = validation_set(n_check, seed=seed)
        calib = [{entry.input_name: np.ascontiguousarray(fit.images, dtype=np.float32)}]
        checks = [{entry.input_name: np.ascontiguousarray(check.images, dtype=np.float32)}]

        def accuracy(_reference, candidate) -> float:
            return float((np.asarray(candidate(checks[0])[0]).argmax(-1) == check.labels).mean())

        return onnx.load(str(get_model_path(name))), calib, checks, accuracy, "top-1 (held-out training images)"
    from model_zoo import real

    model = real.get(name)
    feeds = model.make_inputs("calib", n_fit + n_check, seed=seed)
    calib, checks = feeds[:n_fit], feeds[n_fit:]

    def agreement(reference, candidate) -> float:
        return float(model.task_metric(reference, candidate, checks)[model.primary])

    return onnx.load(str(model.path())), calib, checks, agreement, f"{model.primary} (held-out calib inputs)"


def main(argv: list[str] | None = None) -> int:
    """Check settings; returns the exit code."""
    import onnx_dc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=LENET_MODELS + REAL_MODELS)
    parser.add_argument("--try", dest="tries", action="append", default=[], help="JSON object of DcSettings fields")
    parser.add_argument("--fit", type=int, default=None, help="calibration inputs (default: the benchmark's)")
    parser.add_argument("--check", type=int, default=None, help="check inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lenet = args.model in LENET_MODELS
    n_fit = args.fit or (2000 if lenet else 32)
    n_check = args.check or (5000 if lenet else 16)
    proto, calib, checks, metric, metric_name = _splits(args.model, n_fit, n_check, args.seed)
    original = proto.SerializeToString()
    reference_session = make_session(original, library=False)

    def reference(feed):
        return reference_session.run(None, feed)

    baseline = metric(reference, reference)
    print(f"{args.model}: {metric_name}; original {baseline:.4f}; fit {n_fit}, check {n_check}")
    tries = [DcSettings(**json.loads(text)) for text in args.tries] or [settings_for(args.model).calibrated]
    reference_outputs = [np.concatenate([np.ravel(o) for o in reference(f)]) for f in checks]
    for settings in tries:
        started = time.perf_counter()
        result = onnx_dc.compress(proto, recipe=settings.recipe(), calib=calib)
        seconds = time.perf_counter() - started
        data = result.model.SerializeToString()
        session = make_session(data, library=True)

        def candidate(feed, s=session):
            return s.run(None, feed)

        value = metric(reference, candidate)
        outputs = [np.concatenate([np.ravel(o) for o in candidate(f)]) for f in checks]
        cosine, _ = output_fidelity(reference_outputs, outputs)
        print(
            f"  {settings.describe():60s} ratio {len(original) / len(data):6.2f}x  metric {value:.4f}  "
            f"cosine {cosine:.6f}  {seconds:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
