// Sparse matrix multiplication directly on codebook indices (EIE-style).
//
// The weight W' ([in_features, out_features], the right operand of X @ W') is
// held as codebook indices and compact positions, never as dense floats, in
// one of two orders (2 bytes per nonzero weight either way):
//
// * **Row runs** (input-major, as EIE), for inputs that are mostly zero (ReLU
//   outputs): the columns (outputs) are cut into blocks of at most 2048
//   columns; inside a block the nonzero weights of input row k are a run of
//   16-bit entries
//       entry = (codebook index << column_bits) | (column - first column of block)
//   where column_bits = 16 - (bits of the largest codebook index), so blocks are
//   at most 2^column_bits wide (2048 for codebooks of up to 32 values, 256 for
//   256 values). Runs are stored block by block, row by row, columns
//   ascending; row_offsets delimits each (block, row) run. The kernels visit
//   only the input rows whose activation is nonzero (zero activations are
//   skipped, as in EIE), adding x[k] * codebook[code] into the block's outputs.
// * **Column runs** (output-major), for dense inputs: the rows (inputs) are
//   cut into row blocks of at most 2^column_bits rows; inside a row block the
//   nonzero weights of output column n are a run of 16-bit entries
//       entry = (codebook index << column_bits) | (row - first row of block)
//   stored row block by row block, column by column, rows ascending;
//   column_offsets delimits each (row block, column) run. The kernels gather
//   x[row] and accumulate each output in registers: no read-modify-write of
//   the outputs per weight (about 1.5x faster per visited weight than row
//   runs), but every weight is visited whatever the activations.
//
// Pruned weights and filler entries are not stored: the layout holds 2 bytes
// per nonzero weight plus 4 bytes per (block, row) or (row block, column).
//
// Lightly pruned weights (at least kDenseKeptFraction of the values kept) are
// held instead as dense float32 shared values ([in_features, out_features],
// `dense`): there the codebook lookup and scattered update per kept weight
// cost more than a dense multiply-add over every weight, and the layout saves
// little memory (benchmarks/bench_lenet_latency.py measures the crossover).
//
// Work is split into independent tasks (output blocks or ranges of columns,
// times tiles of the batch) run through a caller-supplied parallel-for, so
// every output is computed by one task in a fixed order: results do not depend
// on the thread count.
#ifndef ONNX_DC_RUNTIME_SPARSE_MATMUL_H_
#define ONNX_DC_RUNTIME_SPARSE_MATMUL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"

namespace onnx_dc {

// Weights with at least this fraction of their values kept use the dense layout.
constexpr double kDenseKeptFraction = 0.25;

// Which order a sparse weight is held in (see above).
enum class SparseOrder {
  kColumns,  // dense inputs: output-major runs, register accumulation
  kRows,     // mostly-zero inputs (ReLU outputs): input-major runs, zero activations skipped
};

struct SparseWeights {
  uint64_t in_features = 0;   // K: rows of W'
  uint64_t out_features = 0;  // N: columns of W'
  SparseOrder order = SparseOrder::kColumns;
  unsigned column_bits = 16;  // low bits of an entry: the column (row runs) or row (column runs) inside its block
  uint32_t block_columns = 0;  // width of every block but possibly the last
  uint32_t num_blocks = 0;
  // Codebook as float32, padded with zeros to 2^(16 - column_bits) values
  // (every index an entry can hold).
  std::vector<float> codebook;
  // Row runs (order kRows): num_blocks * (in_features + 1) offsets into
  // `entries`; the run of (block b, row k) is
  // [row_offsets[b * (K + 1) + k], row_offsets[b * (K + 1) + k + 1]).
  std::vector<uint32_t> row_offsets;
  // Column runs (order kColumns): row blocks of block_rows rows (the last
  // possibly fewer); num_row_blocks * (out_features + 1) offsets into
  // `entries`; the run of (row block r, column n) is
  // [column_offsets[r * (N + 1) + n], column_offsets[r * (N + 1) + n + 1]).
  uint32_t block_rows = 0;
  uint32_t num_row_blocks = 0;
  std::vector<uint32_t> column_offsets;
  // The entries of the runs of the weight's order.
  std::vector<uint16_t> entries;
  // Non-empty for lightly pruned weights: W' as dense float32 values,
  // row-major [in_features, out_features]; the runs are then empty.
  std::vector<float> dense;

  // Bytes held by the layout (what a session keeps for this weight).
  size_t memory_bytes() const;
};

// Builds the layout from a decoded 2-D float32 container. With trans_b false
// the container holds W' itself ([K, N]); with trans_b true it holds W'^T
// ([N, K], Gemm's transB). `order` applies to sparse weights (the dense
// layout has no order). Returns false with a one-line *error otherwise.
bool BuildSparseWeights(const DecodedContainer& decoded, bool trans_b, SparseOrder order, SparseWeights* out,
                        std::string* error);
// The same with column runs (dense inputs).
bool BuildSparseWeights(const DecodedContainer& decoded, bool trans_b, SparseWeights* out, std::string* error);

// Runs fn(context, i) for i in [0, total), possibly in parallel. Returns an
// empty string on success or an error message.
using ParallelForFn = std::string (*)(void* runner, size_t total, void (*fn)(void*, size_t), void* context);

struct MatMulArgs {
  const float* x = nullptr;  // [rows, in_features], row-major
  float* y = nullptr;        // [rows, out_features], row-major
  uint64_t rows = 0;
  float alpha = 1.0f;
  float beta = 1.0f;
  bool relu = false;  // y = max(y, 0) after the bias (a fused Relu)
  const float* bias = nullptr;  // nullptr, or 1 or out_features values
  uint64_t bias_size = 0;
};

// Which compiled kernel variant to use (chosen once per process from CPUID).
enum class KernelIsa { kGeneric, kAvx2 };  // kAvx2: AVX2 + FMA + BMI2
KernelIsa DetectKernelIsa();
const char* KernelIsaName(KernelIsa isa);

// y = alpha * x @ W' + beta * bias (then max(y, 0) with relu). Returns an empty string on success.
std::string SparseMatMul(const SparseWeights& weights, const MatMulArgs& args, KernelIsa isa,
                         ParallelForFn parallel_for, void* runner);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_SPARSE_MATMUL_H_
