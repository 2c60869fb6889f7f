"""Adds a fuzzer finding to the regression corpus, fuzz/regressions/ (run once the bug is fixed).

    python fuzz/add_regression.py FILE --finder cpp|numpy --cause "what was wrong (file: cause)"

The input is copied to ``fuzz/regressions/<finder>-<sha256 prefix>.odc`` and
listed in fuzz/regressions/manifest.json with the outcome both decoders give
now (a FORMAT.md section 7 keyword, or ``valid``); tests/test_fuzz_regressions.py
then holds both decoders to it. Refuses when the two decoders still disagree.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_support  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--finder", required=True, choices=("cpp", "numpy"))
    parser.add_argument("--cause", required=True, help="file and cause of the bug the input found")
    args = parser.parse_args(argv)
    data = args.file.read_bytes()
    numpy_result = fuzz_support.numpy_outcome(data)
    cpp_result = fuzz_support.CppDecoder().outcome(data)
    problem = fuzz_support.disagreement(numpy_result, cpp_result)
    if problem:
        print(f"add_regression: the decoders still disagree ({problem}); fix that first", file=sys.stderr)
        return 1
    name = f"{args.finder}-{hashlib.sha256(data).hexdigest()[:12]}.odc"
    fuzz_support.REGRESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    (fuzz_support.REGRESSIONS_DIR / name).write_bytes(data)
    cases = [c for c in fuzz_support.regression_cases() if c["file"] != name]
    cases.append(
        {
            "file": name,
            "finder": args.finder,
            "found": datetime.date.today().isoformat(),
            "expected": numpy_result.keyword or "valid",
            "cause": args.cause,
        }
    )
    manifest = {"format_version": 1, "regressions": sorted(cases, key=lambda c: c["file"])}
    fuzz_support.REGRESSIONS_MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"fuzz/regressions/{name}: expected {numpy_result.keyword or 'valid'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
