// A decoded container held compactly, for the operators that hand out whole
// rows (DCGather) or the whole tensor (DCDecompress) on every run.
//
// The tensor is viewed as `rows` rows of `row_size` elements (rows =
// dims[0], row_size = the product of the other dimensions; a 0-D tensor is
// one row of one element) and held in one of three forms:
//
// * **codes**: one uint8 codebook index per element, row-major, pruned
//   elements and fillers with the zero index (an index whose value is +0.0:
//   the container's zero symbol when the codebook has fewer than 256 values,
//   else a value whose bits are all zero): 1 byte per element;
// * **sparse rows** (DCGather: chosen when smaller): per row the kept elements as
//   (position inside the row, index) pairs, positions ascending, uint16
//   positions when row_size <= 65536 (else uint32), plus rows + 1 uint64
//   offsets: 3 (or 5) bytes per kept element;
// * **dense bytes**, only when neither fits (a full 256-value codebook
//   without a +0.0 value, pruned elements, and rows longer than 2^32): the
//   decoded tensor itself.
//
// The codebook is a 256-entry table of the element type's bytes (entry
// zero_code all zero bits). Expanding a row is a table lookup per element.
#ifndef ONNX_DC_RUNTIME_COMPACT_H_
#define ONNX_DC_RUNTIME_COMPACT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"

namespace onnx_dc {

enum class CompactForm { kCodes, kSparseRows, kDenseBytes };

struct CompactTensor {
  DType dtype = DType::kFloat32;
  std::vector<uint64_t> dims;
  uint64_t numel = 0;
  uint64_t rows = 0;
  uint64_t row_size = 0;
  size_t itemsize = 4;
  CompactForm form = CompactForm::kCodes;
  uint8_t zero_code = 0;
  uint32_t code_limit = 256;  // kCodes: 1 + the largest code (selects the AVX-512 expansion)
  bool avx512 = false;        // 4-byte values expand with AVX-512 permutes
  std::vector<uint8_t> table;  // 256 * itemsize bytes
  std::vector<uint8_t> codes;  // kCodes: numel; kSparseRows: one per kept element
  std::vector<uint64_t> row_offsets;  // kSparseRows: rows + 1
  std::vector<uint16_t> positions16;  // kSparseRows, row_size <= 65536
  std::vector<uint32_t> positions32;  // kSparseRows, longer rows
  std::vector<uint8_t> dense;         // kDenseBytes: numel * itemsize

  size_t memory_bytes() const;
};

// Builds the compact form of a decoded container (any dtype, any rank). With
// prefer_codes the codes form is taken whenever it is possible (DCDecompress:
// every run expands the whole tensor, which codes do faster); otherwise the
// smaller of codes and sparse rows (DCGather).
void BuildCompactTensor(const DecodedContainer& decoded, bool prefer_codes, CompactTensor* out);

// Writes rows [first_row, first_row + count) (count * row_size elements of
// the tensor's dtype) to `out`.
void ExpandRows(const CompactTensor& tensor, uint64_t first_row, uint64_t count, void* out);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_COMPACT_H_
