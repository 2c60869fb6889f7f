"""atheris (libFuzzer for Python) target for the numpy container decoder, onnx_dc/codec/container.py.

Run through fuzz/run.sh (``fuzz/run.sh numpy SECONDS``) or directly with
libFuzzer flags::

    python fuzz/numpy_fuzzer.py -max_total_time=60 WORK_DIR fuzz/corpus

The decoder modules (container, huffman, bitstream, sparse) are instrumented
for coverage. For each input the target checks:

* only ``ContainerError`` escapes, and its message is one line holding a
  keyword of FORMAT.md section 7;
* ``read_container_info`` agrees with the full decode (a header it rejects is
  rejected by the decode with the same message);
* differential: the C++ decoder (fuzz/build/libodc_shim.so, through ctypes)
  gives the same outcome: the same section 7 keyword, or the same dtype,
  shape and decoded bytes.

Any failed check raises, which atheris reports as a crash and saves the input.
As in the C++ target, the custom mutator recomputes the CRC-32 of 7 mutants
out of 8 so the fuzzer gets past the checksum.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_support  # noqa: E402

with atheris.instrument_imports(
    include=["onnx_dc.codec.container", "onnx_dc.codec.container_reader", "onnx_dc.codec.huffman", "onnx_dc.codec.bitstream", "onnx_dc.codec.relative_indices"]
):
    from onnx_dc.codec.container_reader import read_container_info  # noqa: E402
    from onnx_dc.errors import ContainerError  # noqa: E402

_CPP = fuzz_support.CppDecoder()


class FuzzFinding(AssertionError):
    """A check of the numpy target failed."""


def test_one_input(data: bytes) -> None:
    """Decode ``data`` with both decoders and check the invariants listed in the module docstring."""
    try:
        read_container_info(data, max_elements=fuzz_support.DEFAULT_MAX_ELEMENTS)
        header_error = None
    except ContainerError as error:
        header_error = str(error)
    result = fuzz_support.numpy_outcome(data)
    if not result.valid:
        problem = fuzz_support.one_line_error(result.message)
        if problem:
            raise FuzzFinding(f"numpy decoder: {problem}")
    if header_error is not None and result.message != header_error:
        raise FuzzFinding(f"read_container_info says {header_error!r}, decode says {result.summary()!r}")
    cpp_result = _CPP.outcome(data)
    problem = fuzz_support.disagreement(result, cpp_result)
    if problem:
        raise FuzzFinding(f"decoders disagree: {problem}")


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's byte mutations, then (7 times in 8) a correct CRC-32 in the last four bytes."""
    mutated = atheris.Mutate(data, max_size)
    if len(mutated) >= 28 and seed % 8 != 0:
        mutated = mutated[:-4] + zlib.crc32(mutated[:-4]).to_bytes(4, "little")
    return mutated


def main() -> None:
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
