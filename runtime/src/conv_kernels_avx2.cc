// DCConv kernels for AVX2 + FMA: 4 output channels x 24
// positions in 12 ymm accumulators. Built with -mavx2 -mfma and only
// called when the CPU reports them (DetectGemmIsa).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "conv_kernels.h"

#define ONNX_DC_CONV_MAX_ROWS 4

namespace onnx_dc {
namespace avx2 {

namespace {

struct V {
  using T = __m256;
  static constexpr unsigned kLanes = 8;
  static T Zero() { return _mm256_setzero_ps(); }
  static T Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T Set1(float f) { return _mm256_set1_ps(f); }
  static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  // dst[i] = src[i] for i < n < kLanes.
  // Zeroes the lanes whose bit is set.
  static void StoreZeros(float* p, unsigned bits) {
    const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bits), lane_bits);
    _mm256_maskstore_ps(p, m, _mm256_setzero_ps());
  }
  static T Add(T a, T b) { return _mm256_add_ps(a, b); }
  static void CopyN(float* dst, const float* src, unsigned n) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(dst, m, _mm256_maskload_ps(src, m));
  }
};
constexpr unsigned kTileVectors = 3;
constexpr unsigned kMaxRows = 4;

void DecodeCodes(const uint8_t* codes, uint64_t count, const float* codebook, uint32_t, float* out) {
  for (uint64_t i = 0; i < count; ++i) out[i] = codebook[codes[i]];
}

// Nibble codes (4-bit), scalar.
void DecodeNibbles(const uint8_t* codes, uint64_t first, uint64_t count, const float* codebook, float* out) {
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t j = first + i;
    out[i] = codebook[(codes[j / 2] >> (4 * (j % 2))) & 0xFu];
  }
}

}  // namespace

void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd) {
  uint64_t i = 0;
  for (; i + 8 <= pairs; i += 8) {
    const __m256 a = _mm256_loadu_ps(src + 2 * i), b = _mm256_loadu_ps(src + 2 * i + 8);
    // Per 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs in order.
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_storeu_ps(even + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
    _mm256_storeu_ps(odd + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0))));
  }
  for (; i < pairs; ++i) {
    even[i] = src[2 * i];
    odd[i] = src[2 * i + 1];
  }
}

#include "conv_kernels_impl.h"

// Channels-in-lanes tile: 2 vectors of channels x 6 positions.
constexpr unsigned kLaneVectors = 2;
constexpr unsigned kLanePositions = 6;
#define ONNX_DC_CONV_LANE_VECTORS 2
#define ONNX_DC_CONV_LANE_POSITIONS 6
#include "conv_lanes_impl.h"

}  // namespace avx2
}  // namespace onnx_dc
#else  // not x86: never selected (DetectGemmIsa), forwards to the baseline kernels
#include "conv_kernels.h"

namespace onnx_dc {
namespace avx2 {
unsigned ConvPanelWidth() { return generic::ConvPanelWidth(); }
void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out) {
  generic::ExpandConvCodes(codes, first, count, nibbles, codebook, limit, mask, out);
}
void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd) {
  generic::SplitPhases2(src, pairs, even, odd);
}
void RunConvGemm(const ConvGemmJob& job, uint64_t first, uint64_t end) { generic::RunConvGemm(job, first, end); }
void RunDepthwise(const DepthwiseJob& job, uint64_t task) { generic::RunDepthwise(job, task); }
unsigned ConvLaneBlock() { return generic::ConvLaneBlock(); }
unsigned ConvLaneWidth() { return generic::ConvLaneWidth(); }
void RunConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t first, uint64_t end) {
  generic::RunConvLanes(job, block, first, end);
}
void DecodeConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t k0, uint64_t k1, float* out) {
  generic::DecodeConvLanes(job, block, k0, k1, out);
}
unsigned ConvLaneDepth() { return generic::ConvLaneDepth(); }
void ConvEpilogue(float* y, uint64_t count, const float* bias, const ActivationSpec& activation) {
  generic::ConvEpilogue(y, count, bias, activation);
}
}  // namespace avx2
}  // namespace onnx_dc
#endif
