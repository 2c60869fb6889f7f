// DCConv's channels-in-lanes kernel (ConvLanesJob, conv_kernels.h), shared by
// every instruction-set variant (conv_kernels_{generic,avx2,avx512}.cc).
// Included once per variant inside `namespace onnx_dc::<variant>`, after
// conv_kernels_impl.h, with the variant's
//
//   struct V { using T; static constexpr unsigned kLanes; Zero, Load, Store, Set1, Fma };
//   constexpr unsigned kLaneVectors;    // vectors of output channels of the register tile
//   constexpr unsigned kLanePositions;  // output positions of the register tile
//
// Register tile: kLaneVectors vectors of output channels x kLanePositions
// output positions; per k, kLaneVectors loads of the decoded weight row
// ([blocks][K][kBlock] floats, channels in lanes) and one broadcast input per position
// (any stride or dilation: the inputs are scalars at position_sources[p] +
// offsets[k]). K runs in blocks of kLaneDepth rows (the block's weights,
// kLaneDepth x the block's channels, stay in L1 while every position tile of
// the task passes over them); the task's partial sums ([positions][block]
// floats) start at the bias and, after the last block, get the activation and
// are transposed into Y's NCHW planes.
//
// NOLINT(build/header_guard): deliberately included once per variant.

namespace conv_lanes_detail {

constexpr unsigned kBlock = kLaneVectors * V::kLanes;  // output channels of a block
#ifndef ONNX_DC_CONV_LANE_DEPTH
#define ONNX_DC_CONV_LANE_DEPTH 64
#endif
constexpr uint64_t kLaneDepth = ONNX_DC_CONV_LANE_DEPTH;  // rows of K per block (16 KiB of weights on AVX-512)

// w: the block's weights of rows [k0, k1), [k1 - k0][kBlock] floats.
template <unsigned kVectors, unsigned kPositions>
inline void LanesTile(const ConvLanesJob& job, const float* __restrict w, uint64_t c0, uint64_t p0, uint64_t k0,
                      uint64_t k1, float* __restrict tile) {
  typename V::T acc[kPositions][kVectors];
  if (k0 == 0) {
#pragma GCC unroll 4
    for (unsigned v = 0; v < kVectors; ++v) {
      const typename V::T init = job.bias != nullptr ? V::Load(job.bias + c0 + v * V::kLanes) : V::Zero();
#pragma GCC unroll 8
      for (unsigned q = 0; q < kPositions; ++q) acc[q][v] = init;
    }
  } else {
#pragma GCC unroll 8
    for (unsigned q = 0; q < kPositions; ++q) {
#pragma GCC unroll 4
      for (unsigned v = 0; v < kVectors; ++v) acc[q][v] = V::Load(tile + q * kBlock + v * V::kLanes);
    }
  }
  const float* src[kPositions];
#pragma GCC unroll 8
  for (unsigned q = 0; q < kPositions; ++q) src[q] = job.source + job.position_sources[p0 + q];
  const uint64_t* __restrict offsets = job.offsets;
  for (uint64_t k = k0; k < k1; ++k, w += kBlock) {
    typename V::T wv[kVectors];
#pragma GCC unroll 4
    for (unsigned v = 0; v < kVectors; ++v) wv[v] = V::Load(w + v * V::kLanes);
    const uint64_t offset = offsets[k];
#pragma GCC unroll 8
    for (unsigned q = 0; q < kPositions; ++q) {
      const typename V::T xv = V::Set1(src[q][offset]);
#pragma GCC unroll 4
      for (unsigned v = 0; v < kVectors; ++v) acc[q][v] = V::Fma(wv[v], xv, acc[q][v]);
    }
  }
#pragma GCC unroll 8
  for (unsigned q = 0; q < kPositions; ++q) {
#pragma GCC unroll 4
    for (unsigned v = 0; v < kVectors; ++v) V::Store(tile + q * kBlock + v * V::kLanes, acc[q][v]);
  }
}

template <unsigned kVectors>
inline void LanesTilePositions(const ConvLanesJob& job, const float* w, uint64_t c0, uint64_t p0, unsigned positions,
                               uint64_t k0, uint64_t k1, float* tile) {
  switch (positions) {
#define ONNX_DC_CONV_LANES_CASE(n)                       \
  case n:                                                \
    LanesTile<kVectors, n>(job, w, c0, p0, k0, k1, tile);   \
    break;
    ONNX_DC_CONV_LANES_CASE(1)
    ONNX_DC_CONV_LANES_CASE(2)
    ONNX_DC_CONV_LANES_CASE(3)
    ONNX_DC_CONV_LANES_CASE(4)
#if 6 <= ONNX_DC_CONV_LANE_POSITIONS
    ONNX_DC_CONV_LANES_CASE(5)
    ONNX_DC_CONV_LANES_CASE(6)
#endif
#undef ONNX_DC_CONV_LANES_CASE
    default:
      break;
  }
}

#if defined(__AVX512F__)
// y[c * ld_y + q] = partial[q * kBlock + c] for q < n <= 16, c < channels <= 16: a 16 x 16
// transposition in registers (32-bit and 64-bit interleaves, then two 128-bit lane shuffles).
inline void Transpose16(const float* __restrict partial, unsigned n, unsigned channels, float* __restrict y,
                        uint64_t ld_y) {
  __m512 r[16], t[16];
  for (unsigned q = 0; q < 16; ++q) r[q] = q < n ? _mm512_loadu_ps(partial + q * kBlock) : _mm512_setzero_ps();
  for (unsigned i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (unsigned i = 0; i < 4; ++i) {  // r[4i + e], 128-bit lane j: channel 4j + e of positions 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  for (unsigned e = 0; e < 4; ++e) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44), x1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44);
    const __m512 y1 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
    const __m512 out[4] = {_mm512_shuffle_f32x4(x0, y0, 0x88), _mm512_shuffle_f32x4(x0, y0, 0xDD),
                           _mm512_shuffle_f32x4(x1, y1, 0x88), _mm512_shuffle_f32x4(x1, y1, 0xDD)};
    for (unsigned j = 0; j < 4; ++j) {
      const unsigned c = 4 * j + e;
      if (c >= channels) continue;
      if (n == 16) {
        _mm512_storeu_ps(y + c * ld_y, out[j]);
      } else {
        _mm512_mask_storeu_ps(y + c * ld_y, mask, out[j]);
      }
    }
  }
}
#endif

}  // namespace conv_lanes_detail

unsigned ConvLaneBlock() { return conv_lanes_detail::kBlock; }
unsigned ConvLaneWidth() { return V::kLanes; }
unsigned ConvLaneDepth() { return static_cast<unsigned>(conv_lanes_detail::kLaneDepth); }

void DecodeConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t k0, uint64_t k1, float* out) {
  using namespace conv_lanes_detail;  // NOLINT(build/namespaces)
  const uint64_t c0 = block * kBlock;
  if (c0 >= job.channels || k0 >= k1) return;
  const uint64_t channels = std::min<uint64_t>(kBlock, job.channels - c0);
  const uint64_t depth = std::min<uint64_t>(kLaneDepth, k1 - k0);
  // One tile's codes of the rows at a time ([depth][rows], contiguous), plus up to 63 codes on
  // either side for the byte-plane order's whole chunks.
  alignas(64) float piece[kLaneDepth * kConvTileRows + 128];
  for (uint64_t t = 0; t < channels; t += kConvTileRows) {
    const uint64_t rows = std::min<uint64_t>(kConvTileRows, channels - t);
    const uint64_t first = job.code_first + (c0 + t) * job.k_count + k0 * rows;
    uint64_t begin = first, stop = first + depth * rows;
    if (job.plane_order) {
      begin = first / 64 * 64;
      stop = std::min<uint64_t>(job.code_count, (stop + 63) / 64 * 64);
    }
    if (job.planes != nullptr) {
      avx512::ExpandConvCodesVbmiPlanes(job.codes, begin, stop - begin, job.planes, job.pruned_mask, piece);
    } else {
      job.expand(job.codes, begin, stop - begin, job.nibbles, job.codebook, job.code_limit, job.pruned_mask, piece);
    }
    const float* from = piece + (first - begin);
    float* to = out + t;
    if (rows == kConvTileRows) {
      for (uint64_t k = 0; k < depth; ++k, from += kConvTileRows, to += kBlock)
        std::memcpy(to, from, kConvTileRows * sizeof(float));
    } else {
      for (uint64_t k = 0; k < depth; ++k, from += rows, to += kBlock)
        std::memcpy(to, from, static_cast<size_t>(rows) * sizeof(float));
    }
  }
  if (channels < kBlock) {
    for (uint64_t k = 0; k < depth; ++k)
      std::memset(out + k * kBlock + channels, 0, static_cast<size_t>(kBlock - channels) * sizeof(float));
  }
}

void RunConvLanes(const ConvLanesJob& job, uint64_t block, uint64_t first, uint64_t end) {
  using namespace conv_lanes_detail;  // NOLINT(build/namespaces)
  const uint64_t c0 = block * kBlock;
  if (c0 >= job.channels || first >= end) return;
  const uint64_t channels = std::min<uint64_t>(kBlock, job.channels - c0);
  // Vectors of this block (the last one may hold fewer channels; ld covers them).
  const unsigned vectors = static_cast<unsigned>((channels + V::kLanes - 1) / V::kLanes);
  // The task's partial sums: position p at partial[(p - first) * kBlock].
  const uint64_t count = end - first;
  // Without decoded weights, the block's rows of K are decoded kLaneDepth at a time into `decoded`.
  const uint64_t decoded_floats = job.weights != nullptr ? 0 : kLaneDepth * kBlock;
  std::unique_ptr<float[]> buffer(new float[static_cast<size_t>(decoded_floats + count * kBlock + 16)]);
  float* decoded = conv_detail::AlignTo64(buffer.get());
  float* partial = decoded + decoded_floats;
  for (uint64_t k0 = 0; k0 < job.k_count; k0 += kLaneDepth) {
    const uint64_t k1 = std::min(job.k_count, k0 + kLaneDepth);
    const float* w = decoded;
    if (job.weights != nullptr) {
      w = job.weights + c0 * job.k_count + k0 * kBlock;
    } else {
      DecodeConvLanes(job, block, k0, k1, decoded);
    }
    for (uint64_t p0 = first; p0 < end; p0 += kLanePositions) {
      const unsigned positions = static_cast<unsigned>(std::min<uint64_t>(kLanePositions, end - p0));
      float* tile = partial + (p0 - first) * kBlock;
      switch (vectors) {
        case 1:
          LanesTilePositions<1>(job, w, c0, p0, positions, k0, k1, tile);
          break;
#if 2 <= ONNX_DC_CONV_LANE_VECTORS
        case 2:
          LanesTilePositions<2>(job, w, c0, p0, positions, k0, k1, tile);
          break;
#endif
#if 3 <= ONNX_DC_CONV_LANE_VECTORS
        case 3:
          LanesTilePositions<3>(job, w, c0, p0, positions, k0, k1, tile);
          break;
#endif
#if 4 <= ONNX_DC_CONV_LANE_VECTORS
        case 4:
          LanesTilePositions<4>(job, w, c0, p0, positions, k0, k1, tile);
          break;
#endif
        default:
          break;
      }
    }
  }
  gemm_detail::ActivateRows(partial, kBlock, count, channels, job.activation);
  // Transpose: position p's channels to Y's planes.
  float* y = job.y + c0 * job.positions + first;
#if defined(__AVX512F__)
  for (uint64_t c = 0; c < channels; c += 16) {
    const unsigned lanes = static_cast<unsigned>(std::min<uint64_t>(16, channels - c));
    for (uint64_t q = 0; q < count; q += 16) {
      Transpose16(partial + q * kBlock + c, static_cast<unsigned>(std::min<uint64_t>(16, count - q)), lanes,
                  y + c * job.positions + q, job.positions);
    }
  }
#else
  for (uint64_t m = 0; m < channels; ++m, y += job.positions) {
    const float* from = partial + m;
    for (uint64_t q = 0; q < count; ++q) y[q] = from[q * kBlock];
  }
#endif
}


