"""Cross-check this package's post-processing against the wheels' own code.

``python -m model_zoo.real.crosscheck [--n 8]`` needs OpenCV, pyclipper and Shapely
(``pip install opencv-python-headless pyclipper shapely``), which the rest of onnx-dc
does not. It imports rapidocr's ``DBPostProcess`` and ``CTCLabelDecode`` and nudenet's
``_postprocess`` from the cached rapidocr-onnxruntime 1.4.4 and nudenet 3.4.2 wheels
(unpacked to a temporary directory, not installed), runs the original models on
generated evaluation inputs, and reports how closely :func:`model_zoo.real.ocr.db_boxes`,
:func:`model_zoo.real.ocr.ctc_greedy_decode` and :func:`model_zoo.real.detector.decode`
agree with them (rapidocr's rotated boxes are compared through their bounding boxes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile

import numpy as np

from model_zoo.real import detector, fetch, ocr
from model_zoo.real.matching import MatchCounts, match_boxes
from model_zoo.real.registry import get


def main(argv: list[str] | None = None) -> int:
    """Print the agreement of the numpy post-processing with rapidocr's; exit code 0."""
    parser = argparse.ArgumentParser(prog="python -m model_zoo.real.crosscheck", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="evaluation pages and lines (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import cv2  # noqa: F401  (rapidocr's modules import it)
        import pyclipper  # noqa: F401
        import shapely  # noqa: F401
    except ImportError as error:
        print(f"needs opencv-python-headless, pyclipper and shapely: {error}", file=sys.stderr)
        return 2
    import onnxruntime as ort

    det, rec = get("ppocrv4-det"), get("ppocrv4-rec")
    nudenet = get("nudenet-320n")
    with tempfile.TemporaryDirectory() as unpacked:
        for model in (det, nudenet):
            model.path()
            wheel = fetch._find_cached_wheel(model.source.package, model.source.version)
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(unpacked, [name for name in archive.namelist() if name.endswith((".py", ".yaml"))])
        sys.path.insert(0, unpacked)
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess
        from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

        theirs_db = DBPostProcess(
            thresh=ocr.DET_BINARY_THRESHOLD, box_thresh=ocr.DET_BOX_THRESHOLD,
            max_candidates=ocr.DET_MAX_CANDIDATES, unclip_ratio=ocr.DET_UNCLIP_RATIO,
            score_mode="fast", use_dilation=True,
        )
        det_session = ort.InferenceSession(str(det.path()), providers=["CPUExecutionProvider"])
        counts = MatchCounts()
        for feed in det.make_inputs("eval", args.n, args.seed):
            probability = det_session.run(None, feed)[0]
            mine, _ = ocr.db_boxes(probability)
            polygons, _ = theirs_db(probability, probability.shape[2:])
            theirs = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons], float).reshape(-1, 4)
            counts.add(match_boxes(theirs, mine, min_iou=0.5)[0])
        print(f"DB boxes (rapidocr as reference): F1={counts.f1:.4f} precision={counts.precision:.4f} "
              f"recall={counts.recall:.4f} mean matched IoU={counts.mean_matched_iou:.4f} "
              f"({counts.true_positives + counts.false_negatives} rapidocr boxes on {args.n} pages)")

        characters = rec.characters()
        theirs_ctc = CTCLabelDecode(character=characters[1:-1])
        rec_session = ort.InferenceSession(str(rec.path()), providers=["CPUExecutionProvider"])
        same = 0
        inputs = rec.make_inputs("eval", args.n, args.seed)
        for feed in inputs:
            probabilities = rec_session.run(None, feed)[0]
            same += ocr.ctc_greedy_decode(probabilities, characters)[0][0] == theirs_ctc(probabilities)[0][0]
        print(f"CTC decoding: {same}/{len(inputs)} lines identical to rapidocr's CTCLabelDecode")

        from nudenet.nudenet import _postprocess

        nudenet_session = ort.InferenceSession(str(nudenet.path()), providers=["CPUExecutionProvider"])
        size = detector.INPUT_SIZE_PX
        identical = 0
        boxes_total = 0
        scenes = nudenet.make_inputs("eval", 4 * args.n, args.seed)
        for feed in scenes:
            output = nudenet_session.run(None, feed)
            (mine,) = detector.decode(output[0])
            theirs = sorted((d["class"], *d["box"]) for d in _postprocess(output, 0, 0, 1.0, 1.0, size, size, size, size))
            identical += theirs == sorted(_as_nudenet_boxes(mine, size))
            boxes_total += len(theirs)
        print(f"YOLOv8 decode + NMS: {identical}/{len(scenes)} scenes with detections identical to nudenet's "
              f"_postprocess (class and integer box; {boxes_total} nudenet boxes)")
    return 0


def _as_nudenet_boxes(detections: detector.Detections, size: int) -> list[tuple]:
    """Our detections written the way nudenet reports them: class name, int x, y, w, h clipped to the image."""
    rows = []
    for (x0, y0, x1, y1), label in zip(detections.boxes, detections.classes):
        x = max(0.0, min(float(x0), size))
        y = max(0.0, min(float(y0), size))
        w = min(float(x1 - x0), size - x)
        h = min(float(y1 - y0), size - y)
        rows.append((detector.CLASS_NAMES[int(label)], int(x), int(y), int(w), int(h)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
