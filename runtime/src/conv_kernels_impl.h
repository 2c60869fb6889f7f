// DCConv's code-tile GEMM and depthwise kernels, shared by every
// instruction-set variant (conv_kernels_{generic,avx2,avx512}.cc). Included
// once per variant inside `namespace onnx_dc::<variant>`, after the variant
// has defined
//
//   struct V { using T; static constexpr unsigned kLanes; Zero, Load, Store, Set1, Fma };
//   constexpr unsigned kTileVectors;  // vectors of output positions per row of the register tile
//   constexpr unsigned kMaxRows;      // output channels of the register tile
//   void DecodeCodes(const uint8_t* codes, uint64_t count, const float* codebook, uint32_t limit, float* out);
//
// NOLINT(build/header_guard): deliberately included once per variant.

#include "activation_impl.h"

#ifndef ONNX_DC_CONV_DEPTH_FLOATS
#define ONNX_DC_CONV_DEPTH_FLOATS 6144
#endif
#ifndef ONNX_DC_CONV_PACK_IN_PLACE
#define ONNX_DC_CONV_PACK_IN_PLACE 1
#endif

namespace conv_detail {

constexpr unsigned kPanel = kTileVectors * V::kLanes;
// Rows of K per block: a packed block of kDepth x kPanel floats is 24 KiB.
constexpr unsigned kDepth = ONNX_DC_CONV_DEPTH_FLOATS / kPanel;
// Vectors of output positions the depthwise kernel keeps in registers.
constexpr unsigned kDepthwiseVectors = 4;
constexpr unsigned kDepthwiseSpan = kDepthwiseVectors * V::kLanes;

// out[r][0..kPanel) = init[r] + sum over k of a[k * lda + r] * src[offsets[k] + 0..kPanel), r < kRows,
// where init[r] is in[r * ldi + 0..kPanel) (partial sums), else bias[r], else 0.
template <unsigned kRows>
inline void Tile(const float* __restrict a, unsigned lda, const float* src, const uint64_t* __restrict offsets,
                 uint64_t k_count, const float* in, uint64_t ldi, const float* bias, float* out, uint64_t ldo) {
  typename V::T acc[kRows][kTileVectors];
#pragma GCC unroll 8
  for (unsigned r = 0; r < kRows; ++r) {
    const typename V::T init = bias != nullptr ? V::Set1(bias[r]) : V::Zero();
#pragma GCC unroll 4
    for (unsigned c = 0; c < kTileVectors; ++c) acc[r][c] = in != nullptr ? V::Load(in + r * ldi + c * V::kLanes) : init;
  }
  for (uint64_t k = 0; k < k_count; ++k) {
    const float* b = src + offsets[k];
    typename V::T bv[kTileVectors];
#pragma GCC unroll 4
    for (unsigned c = 0; c < kTileVectors; ++c) bv[c] = V::Load(b + c * V::kLanes);
    const float* ak = a + k * lda;
#pragma GCC unroll 8
    for (unsigned r = 0; r < kRows; ++r) {
      const typename V::T av = V::Set1(ak[r]);
#pragma GCC unroll 4
      for (unsigned c = 0; c < kTileVectors; ++c) acc[r][c] = V::Fma(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (unsigned r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (unsigned c = 0; c < kTileVectors; ++c) V::Store(out + r * ldo + c * V::kLanes, acc[r][c]);
  }
}

inline void TileRows(unsigned rows, const float* a, unsigned lda, const float* src, const uint64_t* offsets,
                     uint64_t k_count, const float* in, uint64_t ldi, const float* bias, float* out, uint64_t ldo) {
  switch (rows) {
#define ONNX_DC_CONV_TILE_CASE(n) \
  case n:                         \
    Tile<n>(a, lda, src, offsets, k_count, in, ldi, bias, out, ldo); \
    break;
    ONNX_DC_CONV_TILE_CASE(1)
    ONNX_DC_CONV_TILE_CASE(2)
    ONNX_DC_CONV_TILE_CASE(3)
#if 4 <= ONNX_DC_CONV_MAX_ROWS
    ONNX_DC_CONV_TILE_CASE(4)
#endif
#if 8 <= ONNX_DC_CONV_MAX_ROWS
    ONNX_DC_CONV_TILE_CASE(5)
    ONNX_DC_CONV_TILE_CASE(6)
    ONNX_DC_CONV_TILE_CASE(7)
    ONNX_DC_CONV_TILE_CASE(8)
#endif
#undef ONNX_DC_CONV_TILE_CASE
    default:
      break;
  }
}

// y[j] = act(y[j] + bias) for j < count (bias: null for none).
inline void Epilogue(float* __restrict y, uint64_t count, const float* bias, const ActivationSpec& activation) {
  if (bias != nullptr) {
    const float b = *bias;
    for (uint64_t j = 0; j < count; ++j) y[j] += b;
  }
  gemm_detail::Activate(y, count, activation);
}

// Few positions: channels in lanes, one output position at a time.
template <unsigned kRows>
inline void FewPositionsRows(const ConvGemmJob& job, uint64_t first, uint64_t end, const float* __restrict a,
                             uint64_t first_channel) {
  const uint64_t k_count = job.k_count;
  const uint64_t* __restrict offsets = job.offsets;
  for (uint64_t p = first; p < end; ++p) {
    float acc[kRows] = {};
    const float* src = job.source + job.position_sources[p];
    for (uint64_t k = 0; k < k_count; ++k) {
      const float xv = src[offsets[k]];
      const float* __restrict ak = a + k * kRows;
      for (unsigned r = 0; r < kRows; ++r) acc[r] += ak[r] * xv;
    }
    for (unsigned r = 0; r < kRows; ++r) {
      float* dst = job.y + (first_channel + r) * job.positions + p;
      *dst = acc[r];
      Epilogue(dst, 1, job.bias != nullptr ? job.bias + first_channel + r : nullptr, job.activation);
    }
  }
}

inline void FewPositions(const ConvGemmJob& job, uint64_t first, uint64_t end, const float* a, unsigned rows,
                         uint64_t first_channel) {
  switch (rows) {
    case 8:
      FewPositionsRows<8>(job, first, end, a, first_channel);
      break;
    case 7:
      FewPositionsRows<7>(job, first, end, a, first_channel);
      break;
    case 6:
      FewPositionsRows<6>(job, first, end, a, first_channel);
      break;
    case 5:
      FewPositionsRows<5>(job, first, end, a, first_channel);
      break;
    case 4:
      FewPositionsRows<4>(job, first, end, a, first_channel);
      break;
    case 3:
      FewPositionsRows<3>(job, first, end, a, first_channel);
      break;
    case 2:
      FewPositionsRows<2>(job, first, end, a, first_channel);
      break;
    default:
      FewPositionsRows<1>(job, first, end, a, first_channel);
      break;
  }
}

// out[i] = 0 where bit first + i of mask is set, i < count: kLanes weights
// per masked store once the bits are byte-aligned.
inline void MaskPruned(const uint8_t* mask, uint64_t first, uint64_t count, float* out) {
  uint64_t i = 0;
  for (; i < count && (first + i) % 8 != 0; ++i) {
    if ((mask[(first + i) / 8] >> ((first + i) % 8)) & 1u) out[i] = 0.0f;
  }
  for (; i + V::kLanes <= count; i += V::kLanes) {
    const uint64_t bit = first + i;
    unsigned bits = 0;
    for (unsigned b = 0; b < (V::kLanes + 7) / 8; ++b) bits |= unsigned{mask[bit / 8 + b]} << (8 * b);
    bits = (bits >> (bit % 8)) & ((1u << V::kLanes) - 1);
    if (bits != 0) V::StoreZeros(out + i, bits);
  }
  for (; i < count; ++i) {
    if ((mask[(first + i) / 8] >> ((first + i) % 8)) & 1u) out[i] = 0.0f;
  }
}

// Depthwise: kVectors vectors of output positions, every tap; even and odd
// taps in two sets of accumulators (twice the independent multiply-adds, so
// short rows are not bound by the multiply-add latency).
template <unsigned kVectors>
inline void DepthwiseChunk(const float* row, const uint64_t* __restrict tap_offsets, const float* __restrict w,
                           uint64_t taps, float bias, float* out) {
  typename V::T even[kVectors], odd[kVectors];
  for (unsigned v = 0; v < kVectors; ++v) {
    even[v] = V::Set1(bias);
    odd[v] = V::Zero();
  }
  uint64_t t = 0;
  for (; t + 2 <= taps; t += 2) {
    const typename V::T w0 = V::Set1(w[t]), w1 = V::Set1(w[t + 1]);
    const float* s0 = row + tap_offsets[t];
    const float* s1 = row + tap_offsets[t + 1];
#pragma GCC unroll 4
    for (unsigned v = 0; v < kVectors; ++v) {
      even[v] = V::Fma(w0, V::Load(s0 + v * V::kLanes), even[v]);
      odd[v] = V::Fma(w1, V::Load(s1 + v * V::kLanes), odd[v]);
    }
  }
  if (t < taps) {
    const typename V::T w0 = V::Set1(w[t]);
    const float* s0 = row + tap_offsets[t];
    for (unsigned v = 0; v < kVectors; ++v) even[v] = V::Fma(w0, V::Load(s0 + v * V::kLanes), even[v]);
  }
  for (unsigned v = 0; v < kVectors; ++v) V::Store(out + v * V::kLanes, V::Add(even[v], odd[v]));
}

inline float* AlignTo64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// dst[i] = src[i] for i < n (short runs: no library call).
inline void CopyFloats(float* __restrict dst, const float* __restrict src, uint64_t n) {
  uint64_t u = 0;
  for (; u + V::kLanes <= n; u += V::kLanes) V::Store(dst + u, V::Load(src + u));
  if (u < n) V::CopyN(dst + u, src + u, static_cast<unsigned>(n - u));
}

// The panel's K rows of kPanel floats, copied one after the other.
inline void PackPanel(const float* src, const uint64_t* __restrict offsets, uint64_t k_count, float* __restrict out) {
  for (uint64_t k = 0; k < k_count; ++k) {
    const float* b = src + offsets[k];
#pragma GCC unroll 4
    for (unsigned c = 0; c < kTileVectors; ++c) V::Store(out + k * kPanel + c * V::kLanes, V::Load(b + c * V::kLanes));
  }
}

// Packs the panel's rows [k0, k0 + depth) of B into out[depth][kPanel]:
// gathered runs, a contiguous source, or a contiguous source and offsets.
inline void PackGathered(const ConvGemmJob& job, const ConvPanel& panel, uint64_t k0, uint64_t depth,
                         float* __restrict out) {
  // Run by run (its source, lane and width fixed over the rows of K).
  const ConvSegment* segments = job.segments + panel.first_segment;
  const uint64_t* __restrict offsets = job.offsets + k0;
  for (uint64_t s = 0; s < panel.segments; ++s) {
    const float* source = job.source + segments[s].source;
    float* to = out + segments[s].lane;
    const unsigned width = segments[s].width;
    const unsigned whole = width / V::kLanes * V::kLanes;
    if (whole == width) {
      for (uint64_t k = 0; k < depth; ++k, to += kPanel) {
        const float* from = source + offsets[k];
        for (unsigned u = 0; u < whole; u += V::kLanes) V::Store(to + u, V::Load(from + u));
      }
    } else {
      for (uint64_t k = 0; k < depth; ++k, to += kPanel) {
        const float* from = source + offsets[k];
        for (unsigned u = 0; u < whole; u += V::kLanes) V::Store(to + u, V::Load(from + u));
        V::CopyN(to + whole, from + whole, width - whole);
      }
    }
  }
}

}  // namespace conv_detail

unsigned ConvPanelWidth() { return conv_detail::kPanel; }

void ExpandConvCodes(const uint8_t* codes, uint64_t first, uint64_t count, bool nibbles, const float* codebook,
                     uint32_t limit, const uint8_t* mask, float* out) {
  if (nibbles) {
    DecodeNibbles(codes, first, count, codebook, out);
  } else {
    DecodeCodes(codes + first, count, codebook, limit, out);
  }
  if (mask != nullptr) conv_detail::MaskPruned(mask, first, count, out);
}

void ConvEpilogue(float* y, uint64_t count, const float* bias, const ActivationSpec& activation) {
  conv_detail::Epilogue(y, count, bias, activation);
}

void RunConvGemm(const ConvGemmJob& job, uint64_t first, uint64_t end) {
  using namespace conv_detail;  // NOLINT(build/namespaces)
  const uint64_t k_count = job.k_count;
  if (job.few_positions) {
    std::vector<float> a(job.decoded != nullptr ? 0 : static_cast<size_t>(k_count * kConvTileRows));
    for (uint64_t first_channel = 0; first_channel < job.channels; first_channel += kConvTileRows) {
      const unsigned rows = static_cast<unsigned>(std::min<uint64_t>(kConvTileRows, job.channels - first_channel));
      const float* tile = job.decoded + first_channel * k_count;
      if (job.decoded == nullptr) {
        ExpandConvCodes(job.codes, job.code_first + first_channel * k_count, k_count * rows, job.nibbles,
                        job.codebook, job.code_limit, job.pruned_mask, a.data());
        tile = a.data();
      }
      FewPositions(job, first, end, tile, rows, first_channel);
    }
    return;
  }
  // Per panel and block of kDepth rows of K: the block's rows packed into one
  // contiguous, 64-byte aligned block of kDepth x kPanel floats that stays in
  // L1 (gathered panels always; in-place ones when more than one tile of
  // channels reads them), then every tile of channels accumulates into the
  // task's partial sums ([channels][kPanel]); the last block's sums get the
  // bias and activation on their way to Y.
  // In-place panels are packed when at least three tiles of channels read them.
  const bool pack_in_place = ONNX_DC_CONV_PACK_IN_PLACE && job.channels > 2 * kConvTileRows;
  // K in equal blocks of at most kDepth rows (no short last block).
  const uint64_t blocks = (k_count + kDepth - 1) / kDepth;
  const uint64_t block_depth = (k_count + blocks - 1) / blocks;
  std::unique_ptr<float[]> buffer(new float[static_cast<size_t>(kDepth * kPanel + job.channels * kPanel + 16)]);
  float* packed = AlignTo64(buffer.get());
  float* partial = packed + kDepth * kPanel;
  std::vector<uint64_t> packed_offsets(kDepth);
  for (uint64_t k = 0; k < kDepth; ++k) packed_offsets[k] = k * kPanel;
  // Weights decoded by the task when the call did not decode them all: one
  // tile's block at a time.
  std::vector<float> a_block(job.decoded != nullptr ? 0 : static_cast<size_t>(kDepth * kConvTileRows));
  for (uint64_t i = first; i < end; ++i) {
    const ConvPanel& panel = job.panels[i];
    for (uint64_t k0 = 0; k0 < k_count; k0 += block_depth) {
      const uint64_t depth = std::min<uint64_t>(block_depth, k_count - k0);
      const float* b = packed;
      const uint64_t* b_offsets = packed_offsets.data();
      if (panel.kind == PanelSource::kGather) {
        PackGathered(job, panel, k0, depth, packed);
      } else {
        const bool tail = panel.kind == PanelSource::kTail;
        const float* src = tail ? job.tail_source : job.source + panel.source;
        const uint64_t* offsets = (tail ? job.tail_offsets : job.offsets) + k0;
        if (pack_in_place) {
          PackPanel(src, offsets, depth, packed);
        } else {
          b = src;
          b_offsets = offsets;
        }
      }
      // The last block of an in-place panel goes straight to Y; the bias is
      // the first block's initial value.
      const bool last = k0 + depth == k_count;
      const bool direct = last && (panel.kind == PanelSource::kInPlace ||
                                   (panel.kind == PanelSource::kGather && panel.width == kPanel));
      for (uint64_t first_channel = 0; first_channel < job.channels; first_channel += kConvTileRows) {
        const unsigned rows = static_cast<unsigned>(std::min<uint64_t>(kConvTileRows, job.channels - first_channel));
        const float* a;
        if (job.decoded != nullptr) {
          a = job.decoded + first_channel * k_count + k0 * rows;
        } else {
          ExpandConvCodes(job.codes, job.code_first + first_channel * k_count + k0 * rows, depth * rows,
                          job.nibbles, job.codebook, job.code_limit, job.pruned_mask, a_block.data());
          a = a_block.data();
        }
        for (unsigned r0 = 0; r0 < rows; r0 += kMaxRows) {
          const uint64_t m = first_channel + r0;
          const float* in = k0 > 0 ? partial + m * kPanel : nullptr;
          const float* bias = k0 == 0 && job.bias != nullptr ? job.bias + m : nullptr;
          float* out = direct ? job.y + m * job.positions + panel.output : partial + m * kPanel;
          TileRows(std::min(kMaxRows, rows - r0), a + r0, rows, b, b_offsets, depth, in, kPanel, bias, out,
                   direct ? job.positions : kPanel);
        }
      }
    }
    // The activation runs over the panel's outputs while they are in L1: in Y for the panels
    // written straight there, else in the partial sums before their runs are copied out.
    if (panel.kind == PanelSource::kInPlace || (panel.kind == PanelSource::kGather && panel.width == kPanel)) {
      gemm_detail::ActivateRows(job.y + panel.output, job.positions, job.channels, panel.width, job.activation);
    } else if (panel.kind == PanelSource::kGather) {
      const ConvSegment* segments = job.segments + panel.first_segment;
      uint64_t lanes = 0;  // the lanes the runs fill
      for (uint64_t s = 0; s < panel.segments; ++s) lanes = std::max<uint64_t>(lanes, segments[s].lane + segments[s].width);
      gemm_detail::ActivateRows(partial, kPanel, job.channels, lanes, job.activation);
      for (uint64_t m = 0; m < job.channels; ++m) {
        for (uint64_t s = 0; s < panel.segments; ++s) {
          CopyFloats(job.y + m * job.positions + segments[s].output, partial + m * kPanel + segments[s].lane,
                     segments[s].width);
        }
      }
    } else {
      gemm_detail::ActivateRows(partial, kPanel, job.channels, panel.width, job.activation);
      for (uint64_t m = 0; m < job.channels; ++m)
        CopyFloats(job.y + m * job.positions + panel.output, partial + m * kPanel, panel.width);
    }
  }
}

void RunDepthwise(const DepthwiseJob& job, uint64_t task) {
  using namespace conv_detail;  // NOLINT(build/namespaces)
  const uint64_t channel_blocks = (job.channels + job.channels_per_task - 1) / job.channels_per_task;
  const uint64_t block = task % job.tasks_per_plane;
  const uint64_t image = task / job.tasks_per_plane / channel_blocks;
  const uint64_t m0 = task / job.tasks_per_plane % channel_blocks * job.channels_per_task;
  const uint64_t m1 = std::min(job.channels, m0 + job.channels_per_task);
  const uint64_t oh0 = block * job.rows_per_task;
  const uint64_t oh1 = std::min(job.out_h, oh0 + job.rows_per_task);
  if (oh0 >= oh1) return;
  const uint64_t sh = static_cast<uint64_t>(job.stride_h), sw = static_cast<uint64_t>(job.stride_w);
  const uint64_t dh = static_cast<uint64_t>(job.dilation_h), dw = static_cast<uint64_t>(job.dilation_w);
  // The padded rows this task reads, each split into its stride_w phases of
  // phase_floats (kDepthwiseSpan floats of zero slack each). The zeros (pads
  // and slack) are the same for every channel: written once.
  const uint64_t columns = (job.out_w - 1) * sw + (job.kernel_w - 1) * dw + 1;
  const uint64_t phase_floats = (columns + sw - 1) / sw + kDepthwiseSpan;
  const uint64_t row_floats = sw * phase_floats;
  const uint64_t rows = (oh1 - oh0 - 1) * sh + (job.kernel_h - 1) * dh + 1;
  std::vector<float> padded(static_cast<size_t>(rows * row_floats), 0.0f);
  const int64_t in_h = static_cast<int64_t>(job.in_h), in_w = static_cast<int64_t>(job.in_w);
  const int64_t q_begin = std::max<int64_t>(0, job.pad_left);
  const int64_t q_end = std::min<int64_t>(static_cast<int64_t>(columns), in_w + job.pad_left);
  const uint64_t taps = job.kernel_h * job.kernel_w;
  // Per tap, its offset in the padded rows.
  std::vector<uint64_t> tap_offsets(static_cast<size_t>(taps));
  for (uint64_t i = 0; i < job.kernel_h; ++i) {
    for (uint64_t j = 0; j < job.kernel_w; ++j) {
      const uint64_t column = j * dw;
      tap_offsets[i * job.kernel_w + j] = i * dh * row_floats + (column % sw) * phase_floats + column / sw;
    }
  }
  alignas(64) float partial[kDepthwiseSpan];
  uint64_t filled = UINT64_MAX;  // input channel in `padded`
  for (uint64_t m = m0; m < m1; ++m) {
    const uint64_t c = m / job.multiplier;
    if (c != filled) {
      filled = c;
      const float* x_plane = job.x + (image * job.in_channels + c) * job.in_h * job.in_w;
      for (uint64_t r = 0; r < rows && q_end > q_begin; ++r) {
        const int64_t ih = static_cast<int64_t>(oh0 * sh + r) - job.pad_top;
        if (ih < 0 || ih >= in_h) continue;
        const float* src = x_plane + ih * in_w - job.pad_left;
        float* dst = padded.data() + r * row_floats;
        if (sw == 1) {
          std::memcpy(dst + q_begin, src + q_begin, static_cast<size_t>(q_end - q_begin) * sizeof(float));
          continue;
        }
        if (sw == 2) {
          int64_t q = q_begin;
          float* even = dst;
          float* odd = dst + phase_floats;
          if (q % 2 != 0) {
            odd[q / 2] = src[q];
            ++q;
          }
          const uint64_t pairs = static_cast<uint64_t>(q_end - q) / 2;
          SplitPhases2(src + q, pairs, even + q / 2, odd + q / 2);
          q += static_cast<int64_t>(2 * pairs);
          if (q < q_end) even[q / 2] = src[q];
          continue;
        }
        for (uint64_t phase = 0; phase < sw; ++phase) {
          // Columns phase, phase + sw, ... from q_begin on.
          const uint64_t ub = static_cast<uint64_t>(q_begin);
          const uint64_t q0 = ub <= phase ? phase : phase + (ub - phase + sw - 1) / sw * sw;
          float* out = dst + phase * phase_floats + q0 / sw;
          for (int64_t q = static_cast<int64_t>(q0); q < q_end; q += static_cast<int64_t>(sw)) *out++ = src[q];
        }
      }
    }
    const float* w = job.weights + m * taps;
    const float bias = job.bias != nullptr ? job.bias[m] : 0.0f;
    for (uint64_t oh = oh0; oh < oh1; ++oh) {
      float* out = job.y + ((image * job.channels + m) * job.out_h + oh) * job.out_w;
      const float* row = padded.data() + (oh - oh0) * sh * row_floats;
      for (uint64_t ow0 = 0; ow0 < job.out_w; ow0 += kDepthwiseSpan) {
        const uint64_t left = job.out_w - ow0;
        // A row's last chunk takes only the vectors it needs.
        const unsigned vectors = left >= kDepthwiseSpan ? kDepthwiseVectors
                                                        : static_cast<unsigned>((left + V::kLanes - 1) / V::kLanes);
        float* target = left >= kDepthwiseSpan ? out + ow0 : partial;
        switch (vectors) {
          case 1:
            DepthwiseChunk<1>(row + ow0, tap_offsets.data(), w, taps, bias, target);
            break;
          case 2:
            DepthwiseChunk<2>(row + ow0, tap_offsets.data(), w, taps, bias, target);
            break;
          case 3:
            DepthwiseChunk<3>(row + ow0, tap_offsets.data(), w, taps, bias, target);
            break;
          default:
            DepthwiseChunk<kDepthwiseVectors>(row + ow0, tap_offsets.data(), w, taps, bias, target);
            break;
        }
        if (left < kDepthwiseSpan) std::memcpy(out + ow0, partial, static_cast<size_t>(left) * sizeof(float));
      }
      gemm_detail::Activate(out, job.out_w, job.activation);
    }
  }
}
