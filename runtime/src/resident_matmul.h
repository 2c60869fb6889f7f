// DCMatMul on a weight kept compressed: the container's chunks are decoded
// during every run instead of once into an in-memory layout.
//
// The in-memory layouts hold an index byte per weight (code panels, gemm.h,
// for lightly pruned weights) or about 2.3 bytes per kept weight (the index
// layout, sparse_matmul.h): for a large model a quarter of the original or
// more. A weight whose layout would exceed kResidentMinLayoutBytes (and 1.5
// times its container) is instead held as its container, which onnxruntime keeps anyway as the
// initializer, plus the per-chunk tables of ChunkedContainer (a few bytes per
// thousand weights): a session then holds the compressed model, at the cost
// of decoding every weight (a table lookup per code word) in every run.
//
// The work is split into a fixed number of tasks (contiguous ranges of
// chunks), each accumulating into its own buffer of a tile of rows; the
// buffers are summed in task order, so the results do not depend on the
// thread count.
#ifndef ONNX_DC_RUNTIME_RESIDENT_MATMUL_H_
#define ONNX_DC_RUNTIME_RESIDENT_MATMUL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"
#include "sparse_matmul.h"

namespace onnx_dc {

// Layouts larger than this (and than 1.5 times the container) are not built:
// the weight stays compressed (32 MiB: code panels of a 4096 x 8192 weight).
constexpr uint64_t kResidentMinLayoutBytes = uint64_t{32} << 20;

// Bytes the in-memory layout would take for a decoded 2-D container, without
// building it: code panels (`panels`, gemm.h: an index byte per weight), or
// the layouts of BuildSparseWeights (dense float32 panels or the index layout).
uint64_t EstimatedLayoutBytes(const DecodedContainer& decoded, bool panels);

// Whether DCMatMul keeps this weight compressed (see above).
bool PreferResident(const DecodedContainer& decoded, size_t container_size, bool panels);

struct ResidentWeights {
  uint64_t in_features = 0;   // K
  uint64_t out_features = 0;  // N
  bool trans_b = false;       // the container holds W'^T ([N, K])
  std::vector<float> codebook;  // K values of the container, then 0 for the zero symbol
  ChunkedContainer container;   // reads the caller's bytes (onnxruntime's initializer)

  size_t memory_bytes() const;
};

// Builds the weight from a decoded 2-D float32 container whose bytes (data,
// size) outlive it. Returns false with a one-line *error otherwise.
bool BuildResidentWeights(const uint8_t* data, size_t size, const DecodedContainer& decoded, bool trans_b,
                          ResidentWeights* out, std::string* error);

// y = alpha * x @ W' + beta * bias (then max(y, 0) with relu). Returns an empty string on success.
std::string ResidentMatMul(const ResidentWeights& weights, const MatMulArgs& args, ParallelForFn parallel_for,
                           void* runner);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_RESIDENT_MATMUL_H_
