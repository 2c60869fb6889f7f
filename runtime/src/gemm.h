// Many-row matrix multiplication on codebook indices ("code panels").
//
// The weight W' ([K, N], the right operand of X @ W') is held as one uint8
// codebook index per weight, in panels of kPanelColumns (32) columns: panel p
// holds columns [32p, 32p + 32) of every row k, [K][32] (indices of the
// columns past N are 0). Pruned weights get the **zero index**: an index
// whose codebook value is +0.0 (the container's zero symbol, K <= 255, or a
// centroid that is exactly 0). The codebook is kept as 256 float32 values.
// 1 byte per weight plus 1 KiB: a quarter of the dense float32 weight.
//
// A call decodes one block of kPanelDepth rows of one panel at a time
// ([kc][32] floats, 16 KiB, into the task's stack) through the codebook and
// multiplies every row of X with it in a register-blocked micro-kernel
// (AVX-512: 14 rows x 32 columns in 28 zmm accumulators; AVX2: 6 x 16 in 12
// ymm, twice per panel; baseline: plain C++). The decoded block is reused by
// every row of X, so decoding costs K * N lookups per call whatever the
// number of rows. Partial sums of the first K blocks go through Y; the last
// block applies alpha, the bias and the activation while the tile is in
// registers / L1.
#ifndef ONNX_DC_RUNTIME_GEMM_H_
#define ONNX_DC_RUNTIME_GEMM_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"
#include "sparse_matmul.h"

namespace onnx_dc {

// Columns per panel and rows per decoded block.
constexpr unsigned kPanelColumns = 32;
constexpr unsigned kPanelDepth = 128;

// Activation applied after alpha * acc + beta * bias.
enum class Activation : uint8_t {
  kNone = 0,
  kRelu = 1,
  kGelu = 2,      // 0.5 x (1 + erf(x / sqrt(2))): ONNX Gelu, approximate = "none"
  kGeluTanh = 3,  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): Gelu "tanh", FastGelu
};
// Parses the DCMatMul attribute value ("", "none", "relu", "gelu", "gelu_tanh"); false if unknown.
bool ParseActivation(const std::string& name, Activation* out);
const char* ActivationName(Activation activation);

struct PanelWeights {
  uint64_t in_features = 0;   // K
  uint64_t out_features = 0;  // N
  uint64_t panels = 0;        // ceil(N / 32)
  uint64_t kept = 0;          // weights that are not pruned
  uint8_t zero_code = 0;      // the index of pruned weights (when kept < K * N)
  uint32_t code_limit = 1;    // 1 + the largest index in `codes` (selects the decoder)
  // Byte-plane order (kPlaneChunk): inside every chunk of 64 indices (two
  // panel rows), position 16 L + 4 q + e holds the index of the weight at
  // 16 q + 4 L + e (L, q < 4, e < 4), the order in which the AVX-512 VBMI
  // decoder's byte interleaving writes its four output vectors. Rows are then
  // padded to an even count.
  bool plane_order = false;
  // kAmx: per codebook index, its value split in two bfloat16 (hi = value
  // rounded, lo = the rest rounded), as hi | lo << 16.
  std::vector<uint32_t> split_codebook;
  std::vector<float> codebook;  // 256 values
  std::vector<uint8_t> codes;   // [panels][K][32]

  size_t memory_bytes() const { return sizeof(*this) + codebook.capacity() * sizeof(float) + codes.capacity(); }
};

// Whether a decoded 2-D float32 container can be held as code panels: its
// pruned weights need an index of value 0 (codebook of fewer than 256 values,
// or a value that is exactly 0).
bool PanelsPossible(const DecodedContainer& decoded);

// Builds the panels (trans_b as BuildSparseWeights) for the kernels of `isa`.
// Returns false with a one-line *error.
enum class GemmIsa;
bool BuildPanelWeights(const DecodedContainer& decoded, bool trans_b, GemmIsa isa, PanelWeights* out,
                       std::string* error);

// Weights with at least this fraction of their values kept are held as code
// panels (when possible), the others in the index layout of sparse_matmul.h.
// A build can move it (-DONNX_DC_PANEL_KEPT_FRACTION=2 forces the index
// layout, 0 the panels) to measure the crossover.
#ifdef ONNX_DC_PANEL_KEPT_FRACTION
constexpr double kPanelKeptFraction = ONNX_DC_PANEL_KEPT_FRACTION;
#else
constexpr double kPanelKeptFraction = 0.25;
#endif

// Which micro-kernels the panel GEMM uses (chosen once per kernel from CPUID).
// kAvx512Vbmi: AVX-512 with VBMI byte permutes (8-bit codebooks decode with
// them, in byte-plane order).
// kAmx: kAvx512Vbmi plus AMX-BF16 tiles and AVX512-BF16 for tasks of many rows
// (the product in three bf16 passes, see gemm_kernels_avx512.cc).
enum class GemmIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi = 3, kAmx = 4 };
// The best the CPU has, capped by ONNX_DC_KERNEL_ISA ("generic", "avx2",
// "avx512", "vbmi", "amx"); kAmx only with allow_amx (DCMatMul's precision =
// "bf16x3") and after Linux granted the AMX tile state.
GemmIsa DetectGemmIsa(bool allow_amx = false);
const char* GemmIsaName(GemmIsa isa);

struct GemmArgs {
  const float* x = nullptr;  // [rows, K]
  float* y = nullptr;        // [rows, N]
  uint64_t rows = 0;
  float alpha = 1.0f;
  float beta = 1.0f;
  Activation activation = Activation::kNone;
  const float* bias = nullptr;  // nullptr, or 1 or N values
  uint64_t bias_size = 0;
};

// y = act(alpha * x @ W' + beta * bias). Returns an empty string on success.
std::string PanelGemm(const PanelWeights& weights, const GemmArgs& args, GemmIsa isa, ParallelForFn parallel_for,
                      void* runner);

// y[i] = act(y[i]) for i < count (the pass after kernels that do not fuse it).
void ApplyActivation(float* y, uint64_t count, Activation activation, GemmIsa isa);

// ------------------------------------------------------------ internal

// Rows of X per task (a multiple of every ISA's tile height).
constexpr uint64_t kPanelTaskRows = 336;

// X packed in tiles of TileRows(isa) rows: tile t, row r, column k at
// packed[(t * K + k) * tile_rows + r] (rows past the end are 0).
unsigned PanelTileRows(GemmIsa isa);

// One task: rows [first_row, end_row) of X times panel `panel`.
struct PanelTask {
  const PanelWeights* weights;
  const GemmArgs* args;
  const float* packed_x;
  uint64_t panel;
  uint64_t first_row;
  uint64_t end_row;
};

namespace generic {
void RunPanelTask(const PanelTask& task);
void ApplyActivationTo(float* y, uint64_t count, Activation activation);
}  // namespace generic
namespace avx2 {
void RunPanelTask(const PanelTask& task);
void ApplyActivationTo(float* y, uint64_t count, Activation activation);
}  // namespace avx2
namespace avx512 {
void RunPanelTask(const PanelTask& task);
void RunPanelTaskVbmi(const PanelTask& task);
void RunPanelTaskAmx(const PanelTask& task);
// out[i] = table[codes[i]] for i < count (4-byte values, any alignment;
// limit = 1 + the largest code).
void ExpandCodes32(const uint8_t* codes, uint64_t count, const uint32_t* table, uint32_t limit, uint32_t* out);
// X packed for the AMX tasks: tile t of 16 rows, K step s of 32: hi then lo
// bfloat16 [16][32] at packed[((t * ksteps + s) * 2 + part) * 512].
void PackTileAmx(const float* x, uint64_t rows, uint64_t k_count, uint64_t tile, uint16_t* packed);
void ApplyActivationTo(float* y, uint64_t count, Activation activation);
}  // namespace avx512

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_GEMM_H_
