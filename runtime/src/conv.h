// 2-D convolution (ONNX Conv semantics, NCHW, float32) on a compressed weight.
//
// Layouts (chosen at session creation from the kept fraction):
// * index layout: per output channel m the run of its kept weights, each one
//   32-bit entry (k << 8) | codebook index, k = (c * kh + i) * kw + j
//   ascending (k < 2^24), plus M + 1 run offsets and a float32 codebook of 256
//   values: 4 bytes per kept weight, pruned weights take no space;
// * dense layout (at least kConvDenseKeptFraction kept, at least
//   kConvBlockChannels channels per group): the shared values as float32,
//   kConvBlockChannels output channels of a group interleaved per k.
//
// Kernel: per image and group the input channels are copied into a
// zero-padded buffer whose rows are split into their stride_w phases, so for
// every kernel element k the inputs of 8 consecutive output positions of a row
// are 8 consecutive floats at a fixed offset (a 1x1 stride-1 unpadded
// convolution reads X in place). Vectors of 8 output positions accumulate in
// AVX registers: 4 channels x 3 vectors per step for the dense layout, one
// channel x up to 8 vectors per kept weight for the index layout. Tasks of the
// caller's parallel-for (onnxruntime's intra-op pool) are chunks of output
// vectors computing every channel of the group, so each output is computed by
// one task in a fixed order: results do not depend on the thread count.
//
// Why not SparseMatMul (sparse_matmul.h) on im2col rows: its batch tile
// accumulates every output channel of a tile of positions in memory, not
// registers, and each patch is copied twice (im2col, then the tile
// transpose); on LeNet-5's convolutions that measured 3-4x slower than
// onnxruntime's Conv (docs/OPERATORS.md, "DCConv: layout and kernel").
#ifndef ONNX_DC_RUNTIME_CONV_H_
#define ONNX_DC_RUNTIME_CONV_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"
#include "sparse_matmul.h"  // KernelIsa, DetectKernelIsa, ParallelForFn

namespace onnx_dc {

// Weights with at least this fraction of their values kept use the dense
// layout (measured crossover: docs/OPERATORS.md, "DCConv: layout and kernel").
constexpr double kConvDenseKeptFraction = 0.6;
// Output channels computed together by the dense kernel.
constexpr uint64_t kConvBlockChannels = 4;

enum class AutoPad { kNotSet, kValid, kSameUpper, kSameLower };

// ONNX Conv's attributes for a 2-D convolution. Empty vectors mean "absent"
// (the ONNX defaults apply: kernel from the weight, strides and dilations 1,
// pads 0).
struct ConvAttributes {
  std::vector<int64_t> kernel_shape;  // [kh, kw]
  std::vector<int64_t> strides;       // [sh, sw]
  std::vector<int64_t> pads;          // [top, left, bottom, right]
  std::vector<int64_t> dilations;     // [dh, dw]
  int64_t group = 1;
  AutoPad auto_pad = AutoPad::kNotSet;
};

// Parses ONNX's auto_pad string ("" is NOTSET). Returns false with a one-line *error.
bool ParseAutoPad(const std::string& text, AutoPad* out, std::string* error);

// The weight of one DCConv node, ready to run.
struct ConvWeights {
  uint64_t out_channels = 0;            // M
  uint64_t in_channels_per_group = 0;   // C / group
  uint64_t kernel_h = 0, kernel_w = 0;  // from the weight's shape
  uint64_t group = 1;
  uint64_t patch_size = 0;  // C / group * kh * kw
  // Validated attributes (defaults filled in).
  int64_t stride_h = 1, stride_w = 1;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t pads[4] = {0, 0, 0, 0};  // top, left, bottom, right (NOTSET only)
  AutoPad auto_pad = AutoPad::kNotSet;
  std::vector<float> codebook;           // 256 values (zero-padded)
  std::vector<uint64_t> channel_offsets;  // M + 1: channel m's run is [offsets[m], offsets[m + 1])
  std::vector<uint32_t> entries;          // (k << 8) | codebook index
  // Dense layout (lightly pruned weights, kConvDenseKeptFraction): the shared
  // values of each block of kConvBlockChannels output channels of a group,
  // [group][block][k][lane] float32 (0 where pruned and in the padding lanes
  // of a group's last block); channel_offsets and entries are then empty.
  std::vector<float> blocks;
  uint64_t blocks_per_group = 0;

  // Bytes held for the weight.
  size_t memory_bytes() const;
};

// Validates the attributes against the decoded 4-D float32 weight and builds
// the layout. Returns false with a one-line *error.
bool BuildConvWeights(const DecodedContainer& decoded, const ConvAttributes& attributes, ConvWeights* out,
                      std::string* error);

// Shapes of one call.
struct ConvGeometry {
  uint64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  uint64_t out_h = 0, out_w = 0;
  int64_t pad_top = 0, pad_left = 0;
};

// Checks X's shape [N, C, H, W] against the weight and attributes and
// computes the output size (ONNX Conv's rules, auto_pad included). Returns
// false with a one-line *error.
bool ComputeConvGeometry(const ConvWeights& weights, const std::vector<int64_t>& x_dims, ConvGeometry* out,
                         std::string* error);

// y[N, M, OH, OW] = conv(x[N, C, H, W], W) + bias[M] (bias may be null).
// Returns an empty string on success or an error message.
std::string RunConv(const ConvWeights& weights, const ConvGeometry& geometry, const float* x, const float* bias,
                    float* y, KernelIsa isa, ParallelForFn parallel_for, void* runner);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_CONV_H_
