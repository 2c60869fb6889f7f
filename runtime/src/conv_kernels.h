// DCConv's GEMM and depthwise kernels (one variant per instruction set:
// conv_kernels_{generic,avx2,avx512}.cc, bodies in conv_kernels_impl.h).
//
// Code tiles (GEMM): per group, Y[m][p] = sum_k W[m][k] * B[k][p], k = (c, i,
// j). The weight is held as uint8 codebook indices in tiles of
// kConvTileRows (8) output channels, [K][rows] per tile (rows = 8, fewer in a
// group's last tile), so one tile's indices decode into the A operand of the
// micro-kernel ([K][rows] floats, broadcast per k). B is never built: its row
// k for a panel of output positions is `source + offsets[k] + panel.source`,
// NR consecutive floats of the input (1x1 stride-1 unpadded: X in place) or of
// a zero-padded copy (stride 1: rows of the padded width, so a panel may cross
// output rows and the columns past OW are computed and dropped; other
// strides: rows split into stride_w phases, panels inside one output row).
// The micro-kernel keeps rows x NR outputs in registers over a block of K
// (AVX-512: 8 x 48 in 24 zmm; AVX2: 4 x 24 in 12 ymm; baseline: 4 x 8).
//
// Depthwise (C / group = 1): per output channel its kh * kw weights, decoded
// to floats once per call, over a zero-padded, phase-split copy of the rows of
// its input channel that a task needs; 4 vectors of output positions in
// registers per tap.
#ifndef ONNX_DC_RUNTIME_CONV_KERNELS_H_
#define ONNX_DC_RUNTIME_CONV_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "gemm.h"  // ActivationSpec, GemmIsa

namespace onnx_dc {

// Output channels per code tile (the layout; AVX2 and baseline kernels take
// a tile in two halves).
constexpr unsigned kConvTileRows = 8;

// One run of a gathered panel's lanes: lanes [lane, lane + width) read
// source floats [source, source + width) (plus offsets[k]) and are output
// positions [output, output + width).
struct ConvSegment {
  uint64_t source;
  uint64_t output;
  uint32_t lane;
  uint32_t width;
};

// Up to kPanel output positions and where their inputs are; in-place and
// tail panels: positions [output, output + width) (width < kPanel only in a
// plane's last panel); gathered panels: their segments'.
enum class PanelSource : uint32_t {
  kInPlace = 0,  // B row k = source + offsets[k] + panel.source, kPanel contiguous floats
  kTail = 1,     // the same from tail_source / tail_offsets (a copy of the last partial panel)
  kGather = 2,   // gathered from `segments` runs (parts of output rows), packed
};
struct ConvPanel {
  uint64_t output;  // gathered panels: set when their runs are one contiguous run of output positions
  uint32_t width;   // gathered panels: kPanel when `output` is set, else 0
  PanelSource kind;
  uint64_t source;         // kInPlace
  uint64_t first_segment;  // kGather: into ConvGemmJob::segments
  uint64_t segments;
};

// One (image, group) of a code-tile convolution.
struct ConvGemmJob {
  const uint8_t* codes = nullptr;  // every code of the weight (bytes or nibbles)
  uint64_t code_first = 0;         // the index of the group's first code
  bool nibbles = false;
  // The group's tiles decoded for this call ([K][rows] floats per tile, the
  // codes' order), or null: each task decodes the tiles it needs.
  const float* decoded = nullptr;
  const float* codebook = nullptr;  // 256 values
  const uint8_t* pruned_mask = nullptr;  // ConvWeights::pruned_mask (bit i: code i) or null
  uint32_t code_limit = 256;        // 1 + the largest index
  uint64_t channels = 0;            // output channels of the group (M / group)
  uint64_t k_count = 0;             // C / group * kh * kw
  const float* source = nullptr;
  const uint64_t* offsets = nullptr;  // per k
  const float* tail_source = nullptr;
  const uint64_t* tail_offsets = nullptr;
  const ConvPanel* panels = nullptr;
  const ConvSegment* segments = nullptr;
  // Few positions (fewer than a panel's worth per image): per position its
  // source index (added to offsets[k]), and the kernel keeps channels in lanes.
  bool few_positions = false;
  const uint64_t* position_sources = nullptr;
  uint64_t positions = 0;  // OH * OW: the output plane (and Y's channel stride)
  float* y = nullptr;      // the group's first output channel of this image
  const float* bias = nullptr;  // the group's first, or null
  ActivationSpec activation;
};

// Channels in lanes (conv_lanes_impl.h): for output maps with few positions
// per row and many channels (small maps, stride-2 layers), the register tile
// holds output channels in the vector lanes and a few output positions, each
// position's input broadcast per k, so no lane is spent on a row's remainder
// and strides cost nothing. One (image, group); tasks are (block of
// ConvLaneBlock() channels, range of output positions).
// Decodes codes [first, first + count) of a weight (bytes or nibbles, optionally in byte-plane order
// with first and count multiples of 64) into floats (ExpandConvCodes, ExpandConvCodesVbmi).
using ConvExpandFn = void (*)(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles,
                              const float* codebook, uint32_t limit, const uint8_t* mask, float* out);

struct ConvLanesJob {
  // The group's weight decoded as [ld / B][K][B] floats (B = ConvLaneBlock()):
  // channel m at block m / B, lane m % B; 0 past M/group. Null: each task
  // decodes its block of channels kLaneDepth rows of K at a time from the
  // codes below into an L1 buffer (DecodeConvLanes).
  const float* weights = nullptr;
  // The weight's codes (ConvWeights: tiles of kConvTileRows channels, [K][rows] each).
  const uint8_t* codes = nullptr;
  uint64_t code_first = 0;   // the group's first code
  uint64_t code_count = 0;   // every code of the weight (plane order: padded to 64)
  bool nibbles = false;
  bool plane_order = false;  // byte-plane order: decoded in whole chunks of 64
  const float* codebook = nullptr;
  uint32_t code_limit = 256;
  const uint8_t* pruned_mask = nullptr;
  ConvExpandFn expand = nullptr;
  // Byte-plane order with AVX-512 VBMI: the codebook's byte planes (ConvCodePlanes), decoded by
  // avx512::ExpandConvCodesVbmiPlanes instead of `expand`; else null.
  const uint8_t* planes = nullptr;
  uint64_t ld = 0;                 // M/group rounded up to a multiple of ConvLaneBlock()
  uint64_t channels = 0;           // output channels of the group (M / group)
  uint64_t k_count = 0;            // C / group * kh * kw
  const float* bias = nullptr;     // [ld] (0 past channels) or null
  const float* source = nullptr;   // the group's first input plane (padded, or X for a 1x1 stride-1 unpadded)
  const uint64_t* offsets = nullptr;           // per k
  const uint64_t* position_sources = nullptr;  // per output position, added to offsets[k]
  uint64_t positions = 0;          // OH * OW (Y's channel stride)
  float* y = nullptr;              // the group's first output channel of this image
  ActivationSpec activation;
};

// One depthwise convolution (every image and channel).
struct DepthwiseJob {
  const float* x = nullptr;        // [N, C, H, W]
  const float* weights = nullptr;  // decoded, [M][kh * kw]
  const float* bias = nullptr;     // [M] or null
  float* y = nullptr;              // [N, M, OH, OW]
  uint64_t channels = 0;           // M
  uint64_t multiplier = 1;         // M / group (input channel = m / multiplier)
  uint64_t in_channels = 0;        // C
  uint64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  uint64_t kernel_h = 0, kernel_w = 0;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int64_t pad_top = 0, pad_left = 0;
  uint64_t rows_per_task = 1;  // output rows of one task
  uint64_t tasks_per_plane = 1;
  uint64_t channels_per_task = 1;  // tasks: (image, block of channels, block of rows)
  ActivationSpec activation;
};

namespace generic {
unsigned ConvPanelWidth();
// even[i] = src[2 i], odd[i] = src[2 i + 1] for i < pairs (stride-2 phases).
void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd);
// out[i] = codebook[code first + i] for i < count, code j being byte j of
// `codes`, or its low (j even) / high (j odd) nibble of byte j / 2 with
// `nibbles`; 0 where bit first + i of mask is set (mask may be null).
void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out);
void RunConvGemm(const ConvGemmJob& job, uint64_t first, uint64_t end);  // panels (or positions) [first, end)
unsigned ConvLaneBlock();  // output channels per block of the channels-in-lanes kernel
unsigned ConvLaneWidth();  // lanes per vector
// Channels [block * ConvLaneBlock(), +ConvLaneBlock()) x output positions [first, end).
void RunConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t first, uint64_t end);
// Rows [k0, k1) of block `block`'s weights decoded from job's codes into out[k1 - k0][ConvLaneBlock()]
// (0 past the group's channels); k1 - k0 <= ConvLaneDepth().
void DecodeConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t k0, uint64_t k1, float* out);
unsigned ConvLaneDepth();  // rows of K per block of the channels-in-lanes kernel
void RunDepthwise(const DepthwiseJob& job, uint64_t task);
void ConvEpilogue(float* y, uint64_t count, const float* bias, const ActivationSpec& activation);
}  // namespace generic
namespace avx2 {
unsigned ConvPanelWidth();
// even[i] = src[2 i], odd[i] = src[2 i + 1] for i < pairs (stride-2 phases).
void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd);
// out[i] = codebook[code first + i] for i < count, code j being byte j of
// `codes`, or its low (j even) / high (j odd) nibble of byte j / 2 with
// `nibbles`; 0 where bit first + i of mask is set (mask may be null).
void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out);
void RunConvGemm(const ConvGemmJob& job, uint64_t first, uint64_t end);
unsigned ConvLaneBlock();  // output channels per block of the channels-in-lanes kernel
unsigned ConvLaneWidth();  // lanes per vector
// Channels [block * ConvLaneBlock(), +ConvLaneBlock()) x output positions [first, end).
void RunConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t first, uint64_t end);
// Rows [k0, k1) of block `block`'s weights decoded from job's codes into out[k1 - k0][ConvLaneBlock()]
// (0 past the group's channels); k1 - k0 <= ConvLaneDepth().
void DecodeConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t k0, uint64_t k1, float* out);
unsigned ConvLaneDepth();  // rows of K per block of the channels-in-lanes kernel
void RunDepthwise(const DepthwiseJob& job, uint64_t task);
void ConvEpilogue(float* y, uint64_t count, const float* bias, const ActivationSpec& activation);
}  // namespace avx2
namespace avx512 {
// ExpandConvCodes for codes in byte-plane order (ConvWeights::plane_order;
// count a multiple of 64; built for AVX-512 VBMI, called only on such CPUs).
void ExpandConvCodesVbmi(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                         uint32_t limit, const uint8_t* mask, float* out);
// The four byte planes of the 256 codebook values (planes[256 p + i] = byte p of value i), and
// ExpandConvCodesVbmi with them given (built once per call rather than per decode).
void ConvCodePlanes(const float* codebook, uint8_t* planes);
void ExpandConvCodesVbmiPlanes(const uint8_t* codes, uint64_t first, uint64_t count, const uint8_t* planes,
                               const uint8_t* mask, float* out);
unsigned ConvPanelWidth();
// even[i] = src[2 i], odd[i] = src[2 i + 1] for i < pairs (stride-2 phases).
void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd);
// out[i] = codebook[code first + i] for i < count, code j being byte j of
// `codes`, or its low (j even) / high (j odd) nibble of byte j / 2 with
// `nibbles`; 0 where bit first + i of mask is set (mask may be null).
void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out);
void RunConvGemm(const ConvGemmJob& job, uint64_t first, uint64_t end);
unsigned ConvLaneBlock();  // output channels per block of the channels-in-lanes kernel
unsigned ConvLaneWidth();  // lanes per vector
// Channels [block * ConvLaneBlock(), +ConvLaneBlock()) x output positions [first, end).
void RunConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t first, uint64_t end);
// Rows [k0, k1) of block `block`'s weights decoded from job's codes into out[k1 - k0][ConvLaneBlock()]
// (0 past the group's channels); k1 - k0 <= ConvLaneDepth().
void DecodeConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t k0, uint64_t k1, float* out);
unsigned ConvLaneDepth();  // rows of K per block of the channels-in-lanes kernel
void RunDepthwise(const DepthwiseJob& job, uint64_t task);
void ConvEpilogue(float* y, uint64_t count, const float* bias, const ActivationSpec& activation);
}  // namespace avx512

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_CONV_KERNELS_H_
