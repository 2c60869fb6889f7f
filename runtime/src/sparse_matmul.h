// Sparse matrix multiplication directly on codebook indices (EIE-style).
//
// The weight W' ([in_features, out_features], the right operand of X @ W') is
// held as codebook indices and compact positions, never as dense floats, in
// runs of nonzero weights in one of two orders:
//
// * **Row runs** (input-major, as EIE), for inputs that are mostly zero (ReLU
//   outputs): the columns (outputs) are cut into blocks of at most 2048
//   columns; a run is the nonzero weights of one input row k inside one
//   block, a position is a column minus the block's first column. The kernels
//   visit only the input rows whose activation is nonzero (zero activations
//   are skipped, as in EIE), adding x[k] * codebook[code] into the block's
//   outputs.
// * **Column runs** (output-major), for dense inputs: the rows (inputs) are
//   cut into row blocks of at most 4096 rows; a run is the nonzero weights of
//   one output column n inside one row block, a position is a row minus the
//   block's first row. The kernels gather x[row] and accumulate each output in
//   registers: no read-modify-write of the outputs per weight, but every
//   weight is visited whatever the activations.
//
// Inside a run the weights are ordered by codebook index, and every
// kGroupSize weights of one index form a **group**: kGroupSize 16-bit
// positions and one 8-bit index for all of them. The rest of the run (fewer
// than kGroupSize weights per index) are **singles**, a 16-bit position and
// an 8-bit index each, after the groups. A group costs the kernels one
// codebook multiply for kGroupSize gathered (column runs) or scattered (row
// runs) values instead of one per weight. Pruned weights and filler entries
// are not stored: about 2.2 bytes per nonzero weight plus 8 bytes per run.
//
// Lightly pruned weights (at least kDenseKeptFraction of the values kept) are
// held instead as dense float32 shared values (`dense`, in panels of 32
// columns): there the codebook lookup and scattered update per kept weight
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

// Columns per panel of the dense layout (four 8-float vectors).
constexpr unsigned kDensePanelColumns = 32;

// Weights of one codebook index that share one index byte inside a run.
constexpr unsigned kGroupSize = 8;

struct SparseWeights {
  uint64_t in_features = 0;   // K: rows of W'
  uint64_t out_features = 0;  // N: columns of W'
  SparseOrder order = SparseOrder::kColumns;
  // Row runs: output blocks of block_columns columns (the last possibly fewer).
  uint32_t block_columns = 0;
  uint32_t num_blocks = 0;
  // Column runs: row blocks of block_rows rows (the last possibly fewer).
  uint32_t block_rows = 0;
  uint32_t num_row_blocks = 0;
  // Codebook as float32, padded with zeros to 256 values (every 8-bit index).
  std::vector<float> codebook;
  // Run i is (block b, row k) for row runs, i = b * (K + 1) + k, and (row
  // block r, column n) for column runs, i = r * (N + 1) + n. Its positions
  // are [run_offsets[i], run_offsets[i + 1]), its groups
  // [group_offsets[i], group_offsets[i + 1]): the first kGroupSize * groups
  // positions are its groups in order, the rest its singles, whose indices
  // start at single_codes[run_offsets[i] - kGroupSize * group_offsets[i]].
  // Both offset arrays have (K + 1) or (N + 1) entries per block, the first
  // entry of a block repeating the last of the previous one.
  std::vector<uint32_t> run_offsets;
  std::vector<uint32_t> group_offsets;
  std::vector<uint16_t> positions;
  std::vector<uint8_t> group_codes;   // one codebook index per group
  std::vector<uint8_t> single_codes;  // one codebook index per single
  // Non-empty for lightly pruned weights: W' as dense float32 values in
  // panels of kDensePanelColumns columns, panel p holding columns
  // [p * kDensePanelColumns, (p + 1) * kDensePanelColumns) as
  // [in_features][kDensePanelColumns] (zero past out_features), so a kernel
  // streams one panel row after another; block_columns is then a multiple of
  // kDensePanelColumns. The runs are empty.
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
