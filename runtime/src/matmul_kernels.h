// The inner kernels of SparseMatMul, compiled once per instruction set
// (matmul_kernels_generic.cc, matmul_kernels_avx2.cc) from
// matmul_kernels_impl.h. Internal to the runtime.
#ifndef ONNX_DC_RUNTIME_MATMUL_KERNELS_H_
#define ONNX_DC_RUNTIME_MATMUL_KERNELS_H_

#include <cstddef>
#include <cstdint>

namespace onnx_dc {

struct SparseWeights;

// Output blocks are at most this wide (long runs per row keep the inner loop
// busy; 2048 floats of outputs stay in L1).
constexpr uint32_t kMaxBlockColumns = 2048;
// Column-run row blocks are at most this high (16-bit positions; 4096 floats
// of x stay in L1).
constexpr uint32_t kMaxBlockRows = 4096;
// A tile accumulator (block width x tile width floats) lives on the task's
// stack and holds at most this many floats (64 KiB).
constexpr unsigned kMaxTileFloats = 16384;
constexpr unsigned kMaxTileWidth = 16;

// What every task knows of its tile of batch rows and of the output.
struct TileTask {
  const SparseWeights* weights;
  // tile_width == 1: the X row itself. tile_width > 1: the tile transposed,
  // x[k * tile_width + t] for t < tile_width (rows past tile_rows are 0).
  const float* x;
  unsigned tile_width;  // 1, 4, 8 or 16 (row runs: width * block columns <= kMaxTileFloats)
  unsigned tile_rows;   // rows of Y this task writes, 1..tile_width
  float* y;             // first element of the tile's first row in Y
  uint64_t y_stride;
  float alpha;
  float beta;
  bool relu;
  const float* bias;  // nullptr, or bias_size values
  uint64_t bias_size;
};

// A row-run (or dense-value) task: one output block of one tile.
struct BlockTask : TileTask {
  uint32_t block;
  // Rows k with a nonzero activation somewhere in the tile, ascending.
  const uint32_t* active_rows;
  uint64_t num_active_rows;
};

// A column-run task: outputs [first_column, end_column) of one tile.
struct ColumnTask : TileTask {
  uint64_t first_column;
  uint64_t end_column;
};

// Column-run tasks cover at most this many outputs (enough tasks for the
// thread pool, long enough to amortise the call).
constexpr uint64_t kColumnTaskColumns = 256;

namespace generic {
void RunBlockTask(const BlockTask& task);
void RunColumnTask(const ColumnTask& task);
}  // namespace generic
namespace avx2 {
void RunBlockTask(const BlockTask& task);
void RunColumnTask(const ColumnTask& task);
}  // namespace avx2

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_MATMUL_KERNELS_H_
