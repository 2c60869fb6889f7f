// Panel GEMM kernels for AVX-512 (F, BW, DQ, VL) + FMA. Built with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma and only called when
// the CPU reports them (DetectGemmIsa).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemm.h"

namespace onnx_dc {
namespace avx512 {

namespace {

// 14 rows x 32 columns: 28 zmm accumulators, two for the panel row, one for
// the X value broadcast.
constexpr unsigned kTileRows = 14;

// b[i] = codebook[codes[i]], 16 at a time, with the codebook's first 16 / 32
// / 64 / 256 values in registers: permutes of 16 indices at a time (no
// gather: the permute port does more per cycle, and gathers are slow on
// some CPUs).
void DecodeBlock(const uint8_t* codes, unsigned kc, const float* codebook, uint32_t limit, float* b) {
  const unsigned count = kc * kPanelColumns;  // a multiple of 16
  if (limit == 17) {
    // 16 values and the zero index just past them (pruned weights): one
    // permute, the index's bit 4 zeroing the lane.
    const __m512 t0 = _mm512_loadu_ps(codebook);
    const __m512i zero_bit = _mm512_set1_epi32(16);
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      _mm512_store_ps(b + i, _mm512_maskz_permutexvar_ps(_mm512_testn_epi32_mask(idx, zero_bit), idx, t0));
    }
  } else if (limit == 33) {
    // 32 values and the zero index: one two-table permute, bit 5 zeroing.
    const __m512 t0 = _mm512_loadu_ps(codebook), t1 = _mm512_loadu_ps(codebook + 16);
    const __m512i zero_bit = _mm512_set1_epi32(32);
    for (unsigned i = 0; i < count; i += 16) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      _mm512_store_ps(b + i, _mm512_maskz_permutex2var_ps(_mm512_testn_epi32_mask(idx, zero_bit), t0, idx, t1));
    }
  } else if (limit <= 16) {
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
#pragma GCC unroll 14
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
#pragma GCC unroll 14
    for (unsigned r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 14
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
    ONNX_DC_TILE_CASE(13)
    ONNX_DC_TILE_CASE(14)
#undef ONNX_DC_TILE_CASE
    default:
      break;
  }
}

// Tasks of at most this many rows (one to three rows of X: batch 1 and small
// batches) decode each panel row in registers and multiply it right away,
// with no decoded block in memory: there the decode is most of the work.
constexpr uint64_t kFewRows = 3;

// Register decoders for one panel row (32 indices -> two vectors) or, in
// byte-plane order, two rows at once (64 indices -> four vectors).
struct Decode16 {
  __m512 t0;
  explicit Decode16(const float* cb) : t0(_mm512_loadu_ps(cb)) {}
  __m512 operator()(__m512i idx) const { return _mm512_permutexvar_ps(idx, t0); }
};
struct Decode16Zero {  // 16 values and the zero index 16
  __m512 t0;
  explicit Decode16Zero(const float* cb) : t0(_mm512_loadu_ps(cb)) {}
  __m512 operator()(__m512i idx) const {
    return _mm512_maskz_permutexvar_ps(_mm512_testn_epi32_mask(idx, _mm512_set1_epi32(16)), idx, t0);
  }
};
struct Decode32Zero {  // 32 values and the zero index 32
  __m512 t0, t1;
  explicit Decode32Zero(const float* cb) : t0(_mm512_loadu_ps(cb)), t1(_mm512_loadu_ps(cb + 16)) {}
  __m512 operator()(__m512i idx) const {
    return _mm512_maskz_permutex2var_ps(_mm512_testn_epi32_mask(idx, _mm512_set1_epi32(32)), t0, idx, t1);
  }
};
struct Decode32 {
  __m512 t0, t1;
  explicit Decode32(const float* cb) : t0(_mm512_loadu_ps(cb)), t1(_mm512_loadu_ps(cb + 16)) {}
  __m512 operator()(__m512i idx) const { return _mm512_permutex2var_ps(t0, idx, t1); }
};
struct Decode64 {
  __m512 t0, t1, t2, t3;
  explicit Decode64(const float* cb)
      : t0(_mm512_loadu_ps(cb)), t1(_mm512_loadu_ps(cb + 16)), t2(_mm512_loadu_ps(cb + 32)),
        t3(_mm512_loadu_ps(cb + 48)) {}
  __m512 operator()(__m512i idx) const {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), _mm512_permutex2var_ps(t0, idx, t1),
                                _mm512_permutex2var_ps(t2, idx, t3));
  }
};
struct Decode256 {
  __m512 t[16];
  explicit Decode256(const float* cb) {
    for (unsigned j = 0; j < 16; ++j) t[j] = _mm512_loadu_ps(cb + 16 * j);
  }
  __m512 operator()(__m512i idx) const {
    const __mmask16 m5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 m6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 m7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 q[4];
    for (unsigned j = 0; j < 4; ++j)
      q[j] = _mm512_mask_blend_ps(m5, _mm512_permutex2var_ps(t[4 * j], idx, t[4 * j + 1]),
                                  _mm512_permutex2var_ps(t[4 * j + 2], idx, t[4 * j + 3]));
    return _mm512_mask_blend_ps(m7, _mm512_mask_blend_ps(m6, q[0], q[1]), _mm512_mask_blend_ps(m6, q[2], q[3]));
  }
};

inline __m512i Indices16(const uint8_t* codes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
}

// acc[r] += x[r][k] * (v0, v1) for the rows of a few-row task.
template <unsigned kRows>
__attribute__((always_inline)) inline void Accumulate(__m512 (&acc)[kRows][2], const float* const* x, uint64_t k,
                                                      __m512 v0, __m512 v1) {
  for (unsigned r = 0; r < kRows; ++r) {
    const __m512 a = _mm512_set1_ps(x[r][k]);
    acc[r][0] = _mm512_fmadd_ps(a, v0, acc[r][0]);
    acc[r][1] = _mm512_fmadd_ps(a, v1, acc[r][1]);
  }
}

template <unsigned kRows>
__attribute__((always_inline)) inline void StoreFewRows(const PanelTask& task, __m512 (&even)[kRows][2],
                                                        __m512 (&odd)[kRows][2]);

// Natural order, one row per step, two accumulator sets (even / odd k) to
// cover the multiply-add latency.
template <unsigned kRows, typename Decoder>
void FewRowsNatural(const PanelTask& task, const Decoder& decode) {
  const PanelWeights& w = *task.weights;
  const uint64_t k_count = w.in_features;
  const uint8_t* codes = w.codes.data() + task.panel * k_count * kPanelColumns;
  const float* x[kRows];
  for (unsigned r = 0; r < kRows; ++r) x[r] = task.args->x + (task.first_row + r) * k_count;
  __m512 even[kRows][2], odd[kRows][2];
  for (unsigned r = 0; r < kRows; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm512_setzero_ps();
  uint64_t k = 0;
  for (; k + 2 <= k_count; k += 2) {
    const uint8_t* c = codes + k * kPanelColumns;
    Accumulate<kRows>(even, x, k, decode(Indices16(c)), decode(Indices16(c + 16)));
    Accumulate<kRows>(odd, x, k + 1, decode(Indices16(c + 32)), decode(Indices16(c + 48)));
  }
  if (k < k_count) {
    const uint8_t* c = codes + k * kPanelColumns;
    Accumulate<kRows>(even, x, k, decode(Indices16(c)), decode(Indices16(c + 16)));
  }
  StoreFewRows<kRows>(task, even, odd);
}

// Byte-plane order (8-bit codebooks with VBMI): two rows per step.
template <unsigned kRows>
__attribute__((target("avx512vbmi"))) void FewRowsPlanes(const PanelTask& task) {
  const PanelWeights& w = *task.weights;
  const uint64_t k_count = w.in_features;
  const uint64_t k_rows = (k_count + 1) / 2 * 2;
  const uint8_t* codes = w.codes.data() + task.panel * k_rows * kPanelColumns;
  alignas(64) uint8_t planes[4][256];
  for (unsigned i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, w.codebook.data() + i, sizeof(bits));
    for (unsigned p = 0; p < 4; ++p) planes[p][i] = static_cast<uint8_t>(bits >> (8 * p));
  }
  __m512i t[4][4];
  for (unsigned p = 0; p < 4; ++p) {
    for (unsigned j = 0; j < 4; ++j) t[p][j] = _mm512_load_si512(planes[p] + 64 * j);
  }
  const float* x[kRows];
  for (unsigned r = 0; r < kRows; ++r) x[r] = task.args->x + (task.first_row + r) * k_count;
  __m512 even[kRows][2], odd[kRows][2];
  for (unsigned r = 0; r < kRows; ++r) even[r][0] = even[r][1] = odd[r][0] = odd[r][1] = _mm512_setzero_ps();
  for (uint64_t k = 0; k < k_count; k += 2) {
    const __m512i idx = _mm512_loadu_si512(codes + k * kPanelColumns);
    const __mmask64 high = _mm512_movepi8_mask(idx);
    __m512i plane[4];
    for (unsigned p = 0; p < 4; ++p) {
      plane[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                                        _mm512_permutex2var_epi8(t[p][2], idx, t[p][3]));
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(plane[0], plane[1]), hi01 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(plane[2], plane[3]), hi23 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    Accumulate<kRows>(even, x, k, _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
                      _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)));
    if (k + 1 < k_count)
      Accumulate<kRows>(odd, x, k + 1, _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
                        _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23)));
  }
  StoreFewRows<kRows>(task, even, odd);
}

template <unsigned kRows>
void FewRowsTyped(const PanelTask& task) {
  const PanelWeights& w = *task.weights;
  const float* cb = w.codebook.data();
  if (w.plane_order) {
    FewRowsPlanes<kRows>(task);
  } else if (w.code_limit == 17) {
    FewRowsNatural<kRows>(task, Decode16Zero(cb));
  } else if (w.code_limit == 33) {
    FewRowsNatural<kRows>(task, Decode32Zero(cb));
  } else if (w.code_limit <= 16) {
    FewRowsNatural<kRows>(task, Decode16(cb));
  } else if (w.code_limit <= 32) {
    FewRowsNatural<kRows>(task, Decode32(cb));
  } else if (w.code_limit <= 64) {
    FewRowsNatural<kRows>(task, Decode64(cb));
  } else {
    FewRowsNatural<kRows>(task, Decode256(cb));
  }
}

void RunFewRows(const PanelTask& task);

}  // namespace

#define ONNX_DC_GEMM_FEW_ROWS 1
#include "gemm_kernels_impl.h"

namespace {

template <unsigned kRows>
__attribute__((always_inline)) inline void StoreFewRows(const PanelTask& task, __m512 (&even)[kRows][2],
                                                        __m512 (&odd)[kRows][2]) {
  const GemmArgs& args = *task.args;
  const uint64_t n_count = task.weights->out_features;
  const uint64_t first_column = task.panel * kPanelColumns;
  const unsigned columns = static_cast<unsigned>(std::min<uint64_t>(kPanelColumns, n_count - first_column));
  const __mmask16 m0 = columns >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << columns) - 1);
  const __mmask16 m1 = columns >= 32 ? 0xFFFF : columns <= 16 ? 0 : static_cast<__mmask16>((1u << (columns - 16)) - 1);
  for (unsigned r = 0; r < kRows; ++r) {
    float* y = args.y + (task.first_row + r) * n_count + first_column;
    _mm512_mask_storeu_ps(y, m0, _mm512_add_ps(even[r][0], odd[r][0]));
    _mm512_mask_storeu_ps(y + 16, m1, _mm512_add_ps(even[r][1], odd[r][1]));
    if (gemm_detail::NeedsEpilogue(args)) gemm_detail::ApplyEpilogue(y, first_column, columns, args);
  }
}

void RunFewRows(const PanelTask& task) {
  switch (task.end_row - task.first_row) {
    case 1:
      FewRowsTyped<1>(task);
      break;
    case 2:
      FewRowsTyped<2>(task);
      break;
    default:
      FewRowsTyped<3>(task);
      break;
  }
}

}  // namespace


// ------------------------------------------------------------ AMX-BF16

// The product in three bfloat16 passes on AMX tiles (CPUs with AMX-BF16:
// Sapphire Rapids and later). Each value is split in two bfloat16, x = x_hi +
// x_lo (hi rounded to nearest, lo the rest rounded), the same for the
// codebook values (PanelWeights::split_codebook), and
// x w ~ x_hi w_hi + x_lo w_hi + x_hi w_lo, accumulated in float32 by
// TDPBF16PS: the dropped x_lo w_lo and the roundings leave about 2^-16 of
// each product (measured: 1e-5 relative to the largest output, against
// 1e-6 for the float kernels and 1e-2 for int8). A TDPBF16PS multiplies a
// 16 x 32 tile of X by a 32 x 16 tile of W' in 16 cycles: the three passes
// still do about 5 times the multiply-adds per cycle of two AVX-512 FMA units.
//
// Tiles: 0, 1 accumulate x_hi w_hi and 2, 3 x_lo w_hi + x_hi w_lo for 16 rows
// x 32 columns (the panel, two halves); 4, 5 hold X's hi and lo 16 x 32; 6, 7
// W's hi, then lo, 32 x 16 each, in the pair layout TDPBF16PS reads (row r
// holds k = 2r and 2r + 1 of every column).

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr unsigned kAmxDepth = 256;  // rows of W' decoded at a time (8 steps of 32)

}  // namespace

__attribute__((target("avx512bf16"))) void PackTileAmx(const float* x, uint64_t rows, uint64_t k_count,
                                                        uint64_t tile, uint16_t* packed) {
  const uint64_t ksteps = (k_count + 31) / 32;
  for (unsigned r = 0; r < 16; ++r) {
    const uint64_t row = tile * 16 + r;
    const float* xr = x + row * k_count;
    for (uint64_t s = 0; s < ksteps; ++s) {
      __m512 x0 = _mm512_setzero_ps(), x1 = _mm512_setzero_ps();
      if (row < rows) {
        const uint64_t k = s * 32;
        const uint64_t left = k_count - k;
        const __mmask16 m0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        const __mmask16 m1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1);
        x0 = _mm512_maskz_loadu_ps(m0, xr + k);
        x1 = _mm512_maskz_loadu_ps(m1, xr + k + 16);
      }
      const __m512bh hi = _mm512_cvtne2ps_pbh(x1, x0);
      const __m512i hi_bits = reinterpret_cast<const __m512i&>(hi);
      // hi back to float: each bf16 in the high half of a 32-bit lane.
      const __m512 hi0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi_bits)), 16));
      const __m512 hi1 =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi_bits, 1)), 16));
      const __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, hi1), _mm512_sub_ps(x0, hi0));
      uint16_t* out = packed + ((tile * ksteps + s) * 2) * 512 + r * 32;
      _mm512_storeu_si512(out, hi_bits);
      _mm512_storeu_si512(out + 512, reinterpret_cast<const __m512i&>(lo));
    }
  }
}

__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512vbmi"))) void RunPanelTaskAmx(const PanelTask& task) {
  const PanelWeights& w = *task.weights;
  const GemmArgs& args = *task.args;
  const uint64_t k_count = w.in_features, n_count = w.out_features;
  const uint64_t ksteps = (k_count + 31) / 32;
  const uint64_t first_column = task.panel * kPanelColumns;
  const unsigned columns = static_cast<unsigned>(std::min<uint64_t>(kPanelColumns, n_count - first_column));
  const uint64_t k_rows = w.plane_order ? (k_count + 1) / 2 * 2 : k_count;
  const uint8_t* codes = w.codes.data() + task.panel * k_rows * kPanelColumns;
  const float* table = reinterpret_cast<const float*>(w.split_codebook.data());
  const uint64_t first_tile = task.first_row / 16;
  const uint64_t tiles = (task.end_row - task.first_row + 15) / 16;
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(task.packed_x);

  alignas(64) uint32_t block[kAmxDepth * kPanelColumns];       // hi | lo << 16 per weight, [k][32]
  alignas(64) uint32_t pairs[kAmxDepth / 32][4][16][16];          // per step: hi c0, hi c1, lo c0, lo c1
  // The task's partial sums: per tile of 16 rows, the hi-hi products [16][32] then the rest [16][32].
  std::vector<float> acc(static_cast<size_t>(tiles) * 32 * kPanelColumns);

  TileConfig config = {};
  config.palette_id = 1;
  for (unsigned t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  for (uint64_t k0 = 0; k0 < k_count; k0 += kAmxDepth) {
    const unsigned kc = static_cast<unsigned>(std::min<uint64_t>(kAmxDepth, k_count - k0));
    const unsigned steps = (kc + 31) / 32;
    float* b = reinterpret_cast<float*>(block);
    if (w.plane_order) {
      DecodeBlockVbmi(codes + k0 * kPanelColumns, kc, table, b);
    } else {
      DecodeBlock(codes + k0 * kPanelColumns, kc, table, w.code_limit, b);
    }
    std::memset(block + kc * kPanelColumns, 0, (steps * 32 - kc) * kPanelColumns * sizeof(uint32_t));
    // Pair layout: row r of a step's tile holds k = 2r (low half) and 2r + 1 (high half).
    const __mmask32 high_halves = 0xAAAAAAAAu;
    for (unsigned s = 0; s < steps; ++s) {
      for (unsigned r = 0; r < 16; ++r) {
        const uint32_t* even = block + (s * 32 + 2 * r) * kPanelColumns;
        const uint32_t* odd = even + kPanelColumns;
        for (unsigned c = 0; c < 2; ++c) {
          const __m512i w0 = _mm512_load_si512(even + 16 * c), w1 = _mm512_load_si512(odd + 16 * c);
          _mm512_store_si512(pairs[s][c][r], _mm512_mask_blend_epi16(high_halves, w0, _mm512_slli_epi32(w1, 16)));
          _mm512_store_si512(pairs[s][2 + c][r], _mm512_mask_blend_epi16(high_halves, _mm512_srli_epi32(w0, 16), w1));
        }
      }
    }
    for (uint64_t t = 0; t < tiles; ++t) {
      // Tiles 0, 1: x_hi w_hi (columns 0-15, 16-31); 2, 3: x_lo w_hi + x_hi w_lo. Four
      // accumulators, at most two products a step on each: the products' latency overlaps.
      float* c = acc.data() + t * 32 * kPanelColumns;
      if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, c, kPanelColumns * sizeof(float));
        _tile_loadd(1, c + 16, kPanelColumns * sizeof(float));
        _tile_loadd(2, c + 16 * kPanelColumns, kPanelColumns * sizeof(float));
        _tile_loadd(3, c + 16 * kPanelColumns + 16, kPanelColumns * sizeof(float));
      }
      const uint16_t* a = packed + ((first_tile + t) * ksteps + k0 / 32) * 2 * 512;
      for (unsigned s = 0; s < steps; ++s, a += 2 * 512) {
        _tile_loadd(4, a, 64);
        _tile_loadd(5, a + 512, 64);
        _tile_loadd(6, pairs[s][0], 64);
        _tile_loadd(7, pairs[s][1], 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, pairs[s][2], 64);
        _tile_loadd(7, pairs[s][3], 64);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
      }
      _tile_stored(0, c, kPanelColumns * sizeof(float));
      _tile_stored(1, c + 16, kPanelColumns * sizeof(float));
      _tile_stored(2, c + 16 * kPanelColumns, kPanelColumns * sizeof(float));
      _tile_stored(3, c + 16 * kPanelColumns + 16, kPanelColumns * sizeof(float));
    }
  }
  _tile_release();
  const bool epilogue = gemm_detail::NeedsEpilogue(args);
  for (uint64_t m = task.first_row; m < task.end_row; ++m) {
    float* y = args.y + m * n_count + first_column;
    const uint64_t t = (m - task.first_row) / 16, r = (m - task.first_row) % 16;
    const float* main = acc.data() + (t * 32 + r) * kPanelColumns;
    const float* rest = main + 16 * kPanelColumns;
    for (unsigned j = 0; j < columns; ++j) y[j] = main[j] + rest[j];
    if (epilogue) gemm_detail::ApplyEpilogue(y, first_column, columns, args);
  }
}

namespace {

template <typename Decoder>
void ExpandWith(const uint8_t* codes, uint64_t count, const Decoder& decode, float* out) {
  uint64_t i = 0;
  for (; i + 16 <= count; i += 16) _mm512_storeu_ps(out + i, decode(Indices16(codes + i)));
  if (i < count) {
    const __mmask16 m = static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, codes + i));
    _mm512_mask_storeu_ps(out + i, m, decode(idx));
  }
}

}  // namespace

void ExpandCodes32(const uint8_t* codes, uint64_t count, const uint32_t* table, uint32_t limit, uint32_t* out) {
  const float* cb = reinterpret_cast<const float*>(table);  // the permutes move bits
  float* dst = reinterpret_cast<float*>(out);
  if (limit <= 16) {
    ExpandWith(codes, count, Decode16(cb), dst);
  } else if (limit <= 32) {
    ExpandWith(codes, count, Decode32(cb), dst);
  } else if (limit <= 64) {
    ExpandWith(codes, count, Decode64(cb), dst);
  } else {
    ExpandWith(codes, count, Decode256(cb), dst);
  }
}

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
void RunPanelTaskAmx(const PanelTask& task) { generic::RunPanelTask(task); }
void ExpandCodes32(const uint8_t* codes, uint64_t count, const uint32_t* table, uint32_t, uint32_t* out) {
  for (uint64_t i = 0; i < count; ++i) out[i] = table[codes[i]];
}
void PackTileAmx(const float*, uint64_t, uint64_t, uint64_t, uint16_t*) {}
void ApplyActivationTo(float* y, uint64_t count, Activation activation) {
  generic::ApplyActivationTo(y, count, activation);
}
}  // namespace avx512
}  // namespace onnx_dc
#endif
