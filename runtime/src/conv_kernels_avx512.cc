// DCConv kernels for AVX-512 (F, BW, DQ, VL) + FMA: 8 output channels x 48
// positions in 24 zmm accumulators. Built with the AVX-512 flags and only
// called when the CPU reports them (DetectGemmIsa).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "conv_kernels.h"

#define ONNX_DC_CONV_MAX_ROWS 8

namespace onnx_dc {
namespace avx512 {

namespace {

struct V {
  using T = __m512;
  static constexpr unsigned kLanes = 16;
  static T Zero() { return _mm512_setzero_ps(); }
  static T Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T Set1(float f) { return _mm512_set1_ps(f); }
  static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  // dst[i] = src[i] for i < n < kLanes.
  // Zeroes the lanes whose bit is set.
  static void StoreZeros(float* p, unsigned bits) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(bits), _mm512_setzero_ps());
  }
  static T Add(T a, T b) { return _mm512_add_ps(a, b); }
  static void CopyN(float* dst, const float* src, unsigned n) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(dst, m, _mm512_maskz_loadu_ps(m, src));
  }
};
constexpr unsigned kTileVectors = 3;
constexpr unsigned kMaxRows = 8;

void DecodeCodes(const uint8_t* codes, uint64_t count, const float* codebook, uint32_t limit, float* out) {
  ExpandCodes32(codes, count, reinterpret_cast<const uint32_t*>(codebook), limit, reinterpret_cast<uint32_t*>(out));
}

// Nibble codes (at most 16 values): 16 bytes give 32 indices; both nibbles
// look up the 16 values in one register, and two permutes interleave them.
void DecodeNibbles(const uint8_t* codes, uint64_t first, uint64_t count, const float* codebook, float* out) {
  uint64_t i = 0;
  if (count > 0 && first % 2 != 0) {
    out[0] = codebook[codes[first / 2] >> 4];
    i = 1;
  }
  const __m512 table = _mm512_loadu_ps(codebook);
  const __m512i low_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high_half = _mm512_add_epi32(low_half, _mm512_set1_epi32(8));
  const __m512i nibble = _mm512_set1_epi32(0xF);
  for (; i + 32 <= count; i += 32) {
    const uint8_t* bytes = codes + (first + i) / 2;  // first + i is even here
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, nibble), table);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(lo, low_half, hi));
    _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(lo, high_half, hi));
  }
  for (; i < count; ++i) {
    const uint64_t j = first + i;
    out[i] = codebook[(codes[j / 2] >> (4 * (j % 2))) & 0xFu];
  }
}

}  // namespace

void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd) {
  const __m512i even_index = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_index = _mm512_add_epi32(even_index, _mm512_set1_epi32(1));
  uint64_t i = 0;
  for (; i + 16 <= pairs; i += 16) {
    const __m512 a = _mm512_loadu_ps(src + 2 * i), b = _mm512_loadu_ps(src + 2 * i + 16);
    _mm512_storeu_ps(even + i, _mm512_permutex2var_ps(a, even_index, b));
    _mm512_storeu_ps(odd + i, _mm512_permutex2var_ps(a, odd_index, b));
  }
  for (; i < pairs; ++i) {
    even[i] = src[2 * i];
    odd[i] = src[2 * i + 1];
  }
}

#include "conv_kernels_impl.h"

// Channels-in-lanes tile: 4 vectors of channels x 6 positions.
constexpr unsigned kLaneVectors = 4;
constexpr unsigned kLanePositions = 6;
#define ONNX_DC_CONV_LANE_VECTORS 4
#define ONNX_DC_CONV_LANE_POSITIONS 6
#include "conv_lanes_impl.h"

void ConvCodePlanes(const float* codebook, uint8_t* planes) {
  for (unsigned i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, codebook + i, sizeof(bits));
    for (unsigned p = 0; p < 4; ++p) planes[p * 256 + i] = static_cast<uint8_t>(bits >> (8 * p));
  }
}

// 64 indices at a time: each of the four bytes of the 256 codebook values is
// a 256-byte plane in 4 zmm; two byte permutes and a blend on bit 7 look up
// one plane, and two rounds of byte / word interleaving assemble the floats
// (the panel GEMM's VBMI decoder, gemm_kernels_avx512.cc).
__attribute__((target("avx512vbmi"))) void ExpandConvCodesVbmiPlanes(const uint8_t* all_codes, uint64_t first,
                                                                      uint64_t count, const uint8_t* planes,
                                                                      const uint8_t* mask, float* out) {
  const uint8_t* codes = all_codes + first;  // first: a multiple of 64
  __m512i t[4][4];
  for (unsigned p = 0; p < 4; ++p) {
    for (unsigned j = 0; j < 4; ++j) t[p][j] = _mm512_loadu_si512(planes + 256 * p + 64 * j);
  }
  for (uint64_t i = 0; i + 64 <= count; i += 64) {
    const __m512i idx = _mm512_loadu_si512(codes + i);
    const __mmask64 high = _mm512_movepi8_mask(idx);
    __m512i plane[4];
    for (unsigned p = 0; p < 4; ++p) {
      plane[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                                        _mm512_permutex2var_epi8(t[p][2], idx, t[p][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    _mm512_storeu_si512(out + i, _mm512_unpacklo_epi16(lo01, lo23));
    _mm512_storeu_si512(out + i + 16, _mm512_unpackhi_epi16(lo01, lo23));
    _mm512_storeu_si512(out + i + 32, _mm512_unpacklo_epi16(hi01, hi23));
    _mm512_storeu_si512(out + i + 48, _mm512_unpackhi_epi16(hi01, hi23));
  }
  if (mask != nullptr) conv_detail::MaskPruned(mask, first, count, out);
}

void ExpandConvCodesVbmi(const uint8_t* all_codes, uint64_t first, uint64_t count, bool, const float* codebook,
                         uint32_t, const uint8_t* mask, float* out) {
  alignas(64) uint8_t planes[4 * 256];
  ConvCodePlanes(codebook, planes);
  ExpandConvCodesVbmiPlanes(all_codes, first, count, planes, mask, out);
}

}  // namespace avx512
}  // namespace onnx_dc
#else  // not x86: never selected (DetectGemmIsa), forwards to the baseline kernels
#include <cstring>

#include "conv_kernels.h"

namespace onnx_dc {
namespace avx512 {
unsigned ConvPanelWidth() { return generic::ConvPanelWidth(); }
void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out) {
  generic::ExpandConvCodes(codes, first, count, nibbles, codebook, limit, mask, out);
}
void SplitPhases2(const float* src, uint64_t pairs, float* even, float* odd) {
  generic::SplitPhases2(src, pairs, even, odd);
}
void ExpandConvCodesVbmi(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                         uint32_t limit, const uint8_t* mask, float* out) {
  generic::ExpandConvCodes(codes, first, count, nibbles, codebook, limit, mask, out);
}
void ConvCodePlanes(const float* codebook, uint8_t* planes) {
  for (unsigned i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, codebook + i, sizeof(bits));
    for (unsigned p = 0; p < 4; ++p) planes[p * 256 + i] = static_cast<uint8_t>(bits >> (8 * p));
  }
}
void ExpandConvCodesVbmiPlanes(const uint8_t* codes, uint64_t first, uint64_t count, const uint8_t* planes,
                               const uint8_t* mask, float* out) {
  // Byte-plane order: position 16 L + 4 q + e of a chunk of 64 holds weight 16 q + 4 L + e.
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t in_chunk = i % 64, l = in_chunk / 16, q = in_chunk / 4 % 4, e = in_chunk % 4;
    const uint8_t code = codes[first + i];
    uint32_t bits = 0;
    for (unsigned p = 0; p < 4; ++p) bits |= uint32_t{planes[p * 256 + code]} << (8 * p);
    std::memcpy(out + (i - in_chunk) + 16 * q + 4 * l + e, &bits, sizeof(bits));
  }
  for (uint64_t i = 0; mask != nullptr && i < count; ++i) {
    if ((mask[(first + i) / 8] >> ((first + i) % 8)) & 1u) out[i] = 0.0f;
  }
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
}  // namespace avx512
}  // namespace onnx_dc
#endif
