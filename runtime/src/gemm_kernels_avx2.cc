// Panel GEMM kernels for AVX2 + FMA. Built with -mavx2 -mfma and only called
// when the CPU reports both (DetectGemmIsa).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"

namespace onnx_dc {
namespace avx2 {

namespace {

// 6 rows x 16 columns: 12 ymm accumulators, two for the panel row's half,
// one broadcast; a panel is two such tiles side by side.
constexpr unsigned kTileRows = 6;

// b[i] = codebook[codes[i]], 8 at a time: one or two permutes of the
// codebook's first 8 / 16 values when every code is below that, a gather otherwise.
void DecodeBlock(const uint8_t* codes, unsigned kc, const float* codebook, uint32_t limit, float* b) {
  const unsigned count = kc * kPanelColumns;  // a multiple of 8
  if (limit <= 8) {
    const __m256 t0 = _mm256_loadu_ps(codebook);
    for (unsigned i = 0; i < count; i += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
      _mm256_store_ps(b + i, _mm256_permutevar8x32_ps(t0, idx));
    }
  } else if (limit <= 16) {
    const __m256 t0 = _mm256_loadu_ps(codebook), t1 = _mm256_loadu_ps(codebook + 8);
    for (unsigned i = 0; i < count; i += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
      const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
      // Bit 3 of the index into the sign bit selects the high half.
      _mm256_store_ps(b + i, _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
    }
  } else {
    for (unsigned i = 0; i < count; i += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
      _mm256_store_ps(b + i, _mm256_i32gather_ps(codebook, idx, 4));
    }
  }
}

// y[r][0..16) (+)= a x b over kc, b's rows 32 floats apart (one half of the panel).
template <unsigned kRows>
__attribute__((always_inline)) inline void HalfTile(const float* __restrict a, const float* __restrict b, unsigned kc,
                                                    float* y, uint64_t ldy, bool accumulate) {
  __m256 c0[kRows], c1[kRows];
#pragma GCC unroll 6
  for (unsigned r = 0; r < kRows; ++r) {
    c0[r] = accumulate ? _mm256_loadu_ps(y + r * ldy) : _mm256_setzero_ps();
    c1[r] = accumulate ? _mm256_loadu_ps(y + r * ldy + 8) : _mm256_setzero_ps();
  }
  for (unsigned k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kPanelColumns);
    const __m256 b1 = _mm256_load_ps(b + k * kPanelColumns + 8);
    const float* ak = a + k * kTileRows;
#pragma GCC unroll 6
    for (unsigned r = 0; r < kRows; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (unsigned r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(y + r * ldy, c0[r]);
    _mm256_storeu_ps(y + r * ldy + 8, c1[r]);
  }
}

template <unsigned kRows>
void Tile(const float* a, const float* b, unsigned kc, float* y, uint64_t ldy, unsigned columns, bool accumulate) {
  for (unsigned half = 0; half < kPanelColumns; half += 16) {
    if (half >= columns) break;
    const unsigned width = std::min(16u, columns - half);
    if (width == 16) {
      HalfTile<kRows>(a, b + half, kc, y + half, ldy, accumulate);
    } else {
      // A partial last half: through a 16-wide copy of the tile's outputs.
      float tmp[kRows * 16] = {};
      for (unsigned r = 0; r < kRows; ++r) {
        if (accumulate) std::memcpy(tmp + r * 16, y + r * ldy + half, width * sizeof(float));
      }
      HalfTile<kRows>(a, b + half, kc, tmp, 16, accumulate);
      for (unsigned r = 0; r < kRows; ++r) std::memcpy(y + r * ldy + half, tmp + r * 16, width * sizeof(float));
    }
  }
}

void MultiplyTile(const float* a, const float* b, unsigned kc, unsigned rows, float* y, uint64_t ldy,
                  unsigned columns, bool accumulate) {
  switch (rows) {
    case 1:
      Tile<1>(a, b, kc, y, ldy, columns, accumulate);
      break;
    case 2:
      Tile<2>(a, b, kc, y, ldy, columns, accumulate);
      break;
    case 3:
      Tile<3>(a, b, kc, y, ldy, columns, accumulate);
      break;
    case 4:
      Tile<4>(a, b, kc, y, ldy, columns, accumulate);
      break;
    case 5:
      Tile<5>(a, b, kc, y, ldy, columns, accumulate);
      break;
    default:
      Tile<6>(a, b, kc, y, ldy, columns, accumulate);
      break;
  }
}

}  // namespace

#include "gemm_kernels_impl.h"

}  // namespace avx2
}  // namespace onnx_dc
#else  // not x86: never selected (DetectGemmIsa), forwards to the baseline kernels
#include "gemm.h"

namespace onnx_dc {
namespace avx2 {
void RunPanelTask(const PanelTask& task) { generic::RunPanelTask(task); }
void ApplyActivationTo(float* y, uint64_t count, Activation activation) {
  generic::ApplyActivationTo(y, count, activation);
}
}  // namespace avx2
}  // namespace onnx_dc
#endif
