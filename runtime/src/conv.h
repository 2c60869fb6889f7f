// 2-D convolution (ONNX Conv semantics, NCHW, float32) on a compressed weight.
//
// Layouts (chosen at session creation from the shape and the kept fraction,
// docs/OPERATORS.md "DCConv: layouts and kernels"):
// * code tiles (group with C / group > 1 and at least kConvIndexKeptFraction
//   of the weights kept): one uint8 codebook index per weight, pruned weights
//   with the zero index, in tiles of kConvTileRows output channels ([K][rows]
//   per tile), decoded a tile at a time into the A operand of a
//   register-blocked GEMM over the input read in place (conv_kernels.h);
// * depthwise (C / group = 1, group > 1): one uint8 index per weight,
//   [M][kh * kw], decoded to floats once per call;
//   (Pruned weights take the zero index, or, with a full 256-value codebook
//   without 0, index 0 and a bit in a mask of 1 bit per weight.)
// * index layout (fewer than kConvIndexKeptFraction kept): per output channel the run of
//   its kept weights, each one 32-bit entry (k << 8) | codebook index,
//   k = (c * kh + i) * kw + j ascending (k < 2^24), plus M + 1 run offsets:
//   4 bytes per kept weight, run by the direct kernels below.
//
// Direct (index-layout) kernel: per image and group the input channels are
// copied into a zero-padded buffer whose rows are split into their stride_w
// phases, so for every kernel element k the inputs of 8 consecutive output
// positions of a row are 8 consecutive floats at a fixed offset (a 1x1
// stride-1 unpadded convolution reads X in place); one channel x up to 8
// vectors per kept weight. Every kernel computes each output in one task in a
// fixed order: results do not depend on the thread count.
#ifndef ONNX_DC_RUNTIME_CONV_H_
#define ONNX_DC_RUNTIME_CONV_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "container.h"
#include "gemm.h"  // ActivationSpec, GemmIsa
#include "sparse_matmul.h"  // KernelIsa, DetectKernelIsa, ParallelForFn

namespace onnx_dc {

// Weights with fewer than this fraction of their values kept use the index
// layout (measured crossover: docs/OPERATORS.md, "DCConv: layouts and
// kernels"). A build can move it (-DONNX_DC_CONV_INDEX_KEPT_FRACTION=2 forces
// the index layout, 0 the code tiles) to measure the crossover.
#ifdef ONNX_DC_CONV_INDEX_KEPT_FRACTION
constexpr double kConvIndexKeptFraction = ONNX_DC_CONV_INDEX_KEPT_FRACTION;
#else
constexpr double kConvIndexKeptFraction = 0.25;
#endif

enum class ConvLayout { kIndex, kCodeTiles, kDepthwise };
const char* ConvLayoutName(ConvLayout layout);

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
  ConvLayout layout = ConvLayout::kIndex;
  uint64_t kept = 0;                     // weights that are not pruned
  std::vector<float> codebook;           // 256 values (zero-padded)
  // Index layout:
  std::vector<uint64_t> channel_offsets;  // M + 1: channel m's run is [offsets[m], offsets[m + 1])
  std::vector<uint32_t> entries;          // (k << 8) | codebook index
  // Code tiles / depthwise: one index per weight (see the layouts above).
  std::vector<uint8_t> codes;
  uint32_t code_limit = 256;  // 1 + the largest index in `codes`
  // Pruned weights whose codebook has no 0 (256 values): bit i set = weight i
  // of `codes` is pruned (its index is 0 and decodes to 0 through the mask).
  std::vector<uint8_t> pruned_mask;
  // Byte-plane order (AVX-512 VBMI, more than 64 codebook values, weights
  // decoded whole per call): inside every chunk of 64 indices, position
  // 16 L + 4 q + e holds the index of weight 16 q + 4 L + e (L, q, e < 4), the
  // order the VBMI decoder's byte interleaving writes; `codes` is padded to
  // a multiple of 64.
  bool plane_order = false;
  // 4-bit codes (every kept index below 16): two per byte, weight 2 i in the
  // low nibble of byte i, 2 i + 1 in the high one: half a byte per weight.
  bool nibbles = false;

  // Bytes held for the weight.
  size_t memory_bytes() const;
};

// Validates the attributes against the decoded 4-D float32 weight and builds
// the layout. Returns false with a one-line *error.
// isa: the kernels' (with AVX-512 VBMI, 8-bit codes are stored in byte-plane
// order for the VBMI decoder).
bool BuildConvWeights(const DecodedContainer& decoded, const ConvAttributes& attributes, GemmIsa isa,
                      ConvWeights* out, std::string* error);

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

// y[N, M, OH, OW] = act(conv(x[N, C, H, W], W) + bias[M]) (bias may be
// null). isa: the direct kernels'; gemm_isa: the code-tile and depthwise
// kernels'. Returns an empty string on success or an error message.
std::string RunConv(const ConvWeights& weights, const ConvGeometry& geometry, const float* x, const float* bias,
                    float* y, const ActivationSpec& activation, KernelIsa isa, GemmIsa gemm_isa,
                    ParallelForFn parallel_for, void* runner);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_CONV_H_
