// Panel GEMM kernels for AVX-512 (F, BW, DQ, VL) + FMA. Built with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma and only called when
// the CPU reports them (DetectGemmIsa).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"

namespace onnx_dc {
namespace avx512 {

namespace {

// 12 rows x 32 columns: 24 zmm accumulators, two for the panel row, the X
// values broadcast from memory.
constexpr unsigned kTileRows = 12;

// b[i] = codebook[codes[i]], 16 at a time, with the codebook's first 16 / 32
// / 64 / 256 values in registers: permutes of 16 indices at a time (no
// gather: the permute port does more per cycle, and gathers are slow on
// some CPUs).
void DecodeBlock(const uint8_t* codes, unsigned kc, const float* codebook, uint32_t limit, float* b) {
  const unsigned count = kc * kPanelColumns;  // a multiple of 16
  if (limit <= 16) {
    const __m512 t0 = _mm512_loadu_ps(codebook);
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      _mm512_store_ps(b + i, _mm512_permutexvar_ps(idx, t0));
    }
  } else if (limit <= 32) {
    const __m512 t0 = _mm512_loadu_ps(codebook), t1 = _mm512_loadu_ps(codebook + 16);
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      _mm512_store_ps(b + i, _mm512_permutex2var_ps(t0, idx, t1));
    }
  } else if (limit <= 64) {
    const __m512 t0 = _mm512_loadu_ps(codebook), t1 = _mm512_loadu_ps(codebook + 16);
    const __m512 t2 = _mm512_loadu_ps(codebook + 32), t3 = _mm512_loadu_ps(codebook + 48);
    const __m512i bit5 = _mm512_set1_epi32(32);
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      const __m512 lo = _mm512_permutex2var_ps(t0, idx, t1);
      const __m512 hi = _mm512_permutex2var_ps(t2, idx, t3);
      _mm512_store_ps(b + i, _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit5), lo, hi));
    }
  } else {
    // Up to 256 values in 16 registers: 8 two-table permutes (the index's
    // low 5 bits), then a tree of 7 blends on bits 5, 6 and 7. Half a cycle of
    // permute port per weight, against about one for a gather.
    __m512 t[16];
    for (unsigned j = 0; j < 16; ++j) t[j] = _mm512_loadu_ps(codebook + 16 * j);
    const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64), bit7 = _mm512_set1_epi32(128);
    const bool upper = limit > 128;
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      const __mmask16 m5 = _mm512_test_epi32_mask(idx, bit5), m6 = _mm512_test_epi32_mask(idx, bit6);
      const __m512 q0 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[0], idx, t[1]),
                                             _mm512_permutex2var_ps(t[2], idx, t[3]));
      const __m512 q1 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[4], idx, t[5]),
                                             _mm512_permutex2var_ps(t[6], idx, t[7]));
      __m512 v = _mm512_mask_blend_ps(m6, q0, q1);
      if (upper) {
        const __m512 q2 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[8], idx, t[9]),
                                               _mm512_permutex2var_ps(t[10], idx, t[11]));
        const __m512 q3 = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[12], idx, t[13]),
                                               _mm512_permutex2var_ps(t[14], idx, t[15]));
        v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit7), v, _mm512_mask_blend_ps(m6, q2, q3));
      }
      _mm512_store_ps(b + i, v);
    }
  }
}

// The 8-bit decoder with VBMI byte permutes: for 64 indices at once, each of
// the four bytes of the codebook values is looked up in its 256-byte plane
// (two 128-byte two-table byte permutes, a blend on bit 7), and two rounds of
// byte / word interleaving assemble the floats. The interleaving works inside
// 128-bit lanes, so the layout stores every chunk of 64 indices in the order
// it writes (PanelWeights::plane_order). Decodes an even number of rows.
__attribute__((target("avx512vbmi"))) void DecodeBlockVbmi(const uint8_t* codes, unsigned kc,
                                                            const float* codebook, float* b) {
  const unsigned count = (kc + 1) / 2 * 2 * kPanelColumns;  // a multiple of 64
  // plane[p][j]: byte p of codebook values 64 j .. 64 j + 63.
  alignas(64) uint8_t planes[4][256];
  for (unsigned i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, codebook + i, sizeof(bits));
    for (unsigned p = 0; p < 4; ++p) planes[p][i] = static_cast<uint8_t>(bits >> (8 * p));
  }
  __m512i t[4][4];
  for (unsigned p = 0; p < 4; ++p) {
    for (unsigned j = 0; j < 4; ++j) t[p][j] = _mm512_load_si512(planes[p] + 64 * j);
  }
  for (unsigned i = 0; i < count; i += 64) {
    const __m512i idx = _mm512_loadu_si512(codes + i);
    const __mmask64 high = _mm512_movepi8_mask(idx);
    __m512i plane[4];
    for (unsigned p = 0; p < 4; ++p) {
      plane[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                                        _mm512_permutex2var_epi8(t[p][2], idx, t[p][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    _mm512_store_si512(b + i, _mm512_unpacklo_epi16(lo01, lo23));
    _mm512_store_si512(b + i + 16, _mm512_unpackhi_epi16(lo01, lo23));
    _mm512_store_si512(b + i + 32, _mm512_unpacklo_epi16(hi01, hi23));
    _mm512_store_si512(b + i + 48, _mm512_unpackhi_epi16(hi01, hi23));
  }
}

template <unsigned kRows>
__attribute__((always_inline)) inline void Tile(const float* __restrict a, const float* __restrict b, unsigned kc,
                                                float* y, uint64_t ldy, __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 c0[kRows], c1[kRows];
#pragma GCC unroll 12
  for (unsigned r = 0; r < kRows; ++r) {
    if (accumulate) {
      c0[r] = _mm512_maskz_loadu_ps(m0, y + r * ldy);
      c1[r] = _mm512_maskz_loadu_ps(m1, y + r * ldy + 16);
    } else {
      c0[r] = _mm512_setzero_ps();
      c1[r] = _mm512_setzero_ps();
    }
  }
  for (unsigned k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * kPanelColumns);
    const __m512 b1 = _mm512_load_ps(b + k * kPanelColumns + 16);
    const float* ak = a + k * kTileRows;
#pragma GCC unroll 12
    for (unsigned r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (unsigned r = 0; r < kRows; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, c0[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, c1[r]);
  }
}

void MultiplyTile(const float* a, const float* b, unsigned kc, unsigned rows, float* y, uint64_t ldy,
                  unsigned columns, bool accumulate) {
  const __mmask16 m0 = columns >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << columns) - 1);
  const __mmask16 m1 = columns >= 32 ? 0xFFFF : columns <= 16 ? 0 : static_cast<__mmask16>((1u << (columns - 16)) - 1);
  switch (rows) {
#define ONNX_DC_TILE_CASE(n) \
  case n:                    \
    Tile<n>(a, b, kc, y, ldy, m0, m1, accumulate); \
    break;
    ONNX_DC_TILE_CASE(1)
    ONNX_DC_TILE_CASE(2)
    ONNX_DC_TILE_CASE(3)
    ONNX_DC_TILE_CASE(4)
    ONNX_DC_TILE_CASE(5)
    ONNX_DC_TILE_CASE(6)
    ONNX_DC_TILE_CASE(7)
    ONNX_DC_TILE_CASE(8)
    ONNX_DC_TILE_CASE(9)
    ONNX_DC_TILE_CASE(10)
    ONNX_DC_TILE_CASE(11)
    ONNX_DC_TILE_CASE(12)
#undef ONNX_DC_TILE_CASE
    default:
      break;
  }
}

}  // namespace

#include "gemm_kernels_impl.h"

void RunPanelTaskVbmi(const PanelTask& task) {
  gemm_detail::RunPanelTaskWith(task, [](const uint8_t* codes, unsigned kc, const PanelWeights& w, float* block) {
    DecodeBlockVbmi(codes, kc, w.codebook.data(), block);
  });
}

}  // namespace avx512
}  // namespace onnx_dc
#else  // not x86: never selected (DetectGemmIsa), forwards to the baseline kernels
#include "gemm.h"

namespace onnx_dc {
namespace avx512 {
void RunPanelTask(const PanelTask& task) { generic::RunPanelTask(task); }
void RunPanelTaskVbmi(const PanelTask& task) { generic::RunPanelTask(task); }
void ApplyActivationTo(float* y, uint64_t count, Activation activation) {
  generic::ApplyActivationTo(y, count, activation);
}
}  // namespace avx512
}  // namespace onnx_dc
#endif
