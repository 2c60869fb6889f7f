// 2-D convolution on a compressed weight: input padding and the kernels
// (see conv.h for the layout and the reasons).
#include "conv.h"

#include "conv_kernels.h"

#include <algorithm>
#include <memory>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ONNX_DC_CONV_AVX2 1
#endif

namespace onnx_dc {

namespace {

// Output positions per vector (one AVX register of floats).
constexpr uint64_t kVector = 8;
// Vectors the per-channel (index layout) kernel keeps in registers at once.
constexpr unsigned kMaxChannelVectors = 8;
// Attribute values beyond this are rejected (no real model comes close, and
// it keeps every size computation far from int64 overflow).
constexpr int64_t kMaxAttribute = int64_t{1} << 31;
// Spatial input sizes beyond this cannot be held in memory anyway.
constexpr int64_t kMaxSpatial = int64_t{1} << 40;
// Patch elements per channel that an entry can address (24 bits of k).
constexpr uint64_t kMaxPatch = uint64_t{1} << 24;
// Largest padded input copy (floats) a call may make: 1 GiB. Far more than
// real models need; it stops a model with enormous pads and strides (a small
// output from a huge padded plane) from exhausting memory.
constexpr uint64_t kMaxPaddedFloats = uint64_t{1} << 28;
// Up to this many weights (all groups) a call decodes the whole weight once,
// into a float buffer the tasks share (4 MiB at most); above, each task decodes
// the tiles it needs.
constexpr uint64_t kConvWholeDecode = uint64_t{1} << 20;

std::string VectorString(const std::vector<int64_t>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + "]";
}

// Reads an optional attribute of `count` values, each in [min_value, kMaxAttribute).
bool ReadAttribute(const char* name, const std::vector<int64_t>& given, size_t count, int64_t min_value,
                   int64_t* out, std::string* error) {
  if (given.empty()) return true;  // absent: keep the default in *out
  if (given.size() != count) {
    *error = std::string("attribute ") + name + " must have " + std::to_string(count) + " values for a 2-D convolution, got " +
             VectorString(given);
    return false;
  }
  for (size_t i = 0; i < count; ++i) {
    if (given[i] < min_value || given[i] >= kMaxAttribute) {
      *error = std::string("attribute ") + name + " = " + VectorString(given) + " has a value outside [" +
               std::to_string(min_value) + ", 2^31)";
      return false;
    }
    out[i] = given[i];
  }
  return true;
}

// Output size and leading pad of one spatial axis (ONNX Conv's rules).
bool AxisGeometry(int64_t in, int64_t kernel, int64_t stride, int64_t dilation, int64_t pad_begin, int64_t pad_end,
                  AutoPad auto_pad, const char* axis, uint64_t* out, int64_t* pad_before, std::string* error) {
  const int64_t extent = dilation * (kernel - 1) + 1;  // < 2^62 (both factors < 2^31)
  int64_t padded = in;
  *pad_before = 0;
  switch (auto_pad) {
    case AutoPad::kNotSet:
      padded = in + pad_begin + pad_end;
      *pad_before = pad_begin;
      break;
    case AutoPad::kValid:
      break;
    case AutoPad::kSameUpper:
    case AutoPad::kSameLower: {
      const int64_t size = (in + stride - 1) / stride;
      const int64_t total = std::max<int64_t>(0, (size > 0 ? size - 1 : 0) * stride + extent - in);
      *pad_before = auto_pad == AutoPad::kSameUpper ? total / 2 : total - total / 2;
      *out = static_cast<uint64_t>(size);
      return true;
    }
  }
  if (padded < extent) {
    *error = std::string("input ") + axis + " size " + std::to_string(in) + " (padded " + std::to_string(padded) +
             ") is smaller than the dilated kernel (" + std::to_string(extent) + ")";
    return false;
  }
  *out = static_cast<uint64_t>((padded - extent) / stride + 1);
  return true;
}

// ---------------------------------------------------------------- one call

// The padded input of one (image, group): channel c, padded row r, padded
// column q = e * sw + phase is at
//     padded[(c * rows + r) * row_floats + phase * phase_floats + e],
// i.e. every row is split into its stride_w phases, so the columns that one
// output row reads for a given kernel column are contiguous (for stride 1 the
// row is just the zero-padded input row). Each phase has kVector floats of
// zero slack, so whole vectors can always be loaded.
struct PaddedInput {
  uint64_t rows = 0;          // (OH - 1) * sh + (kh - 1) * dh + 1
  uint64_t columns = 0;       // (OW - 1) * sw + (kw - 1) * dw + 1
  uint64_t phase_floats = 0;  // ceil(columns / sw) + kVector
  uint64_t row_floats = 0;    // sw * phase_floats
};

// One vector of output positions (consecutive in the output plane).
struct OutputVector {
  uint64_t input_offset;   // source offset of its first position (kernel element 0)
  uint64_t output_offset;  // position in the output plane
  uint64_t width;          // positions (1..kVector)
};

// What the kernels read for some vectors: value of kernel element k at the
// vector's first position is source[vector.input_offset + offsets[k]], the
// next kVector - 1 floats follow it.
struct Source {
  const float* data;
  const uint64_t* offsets;
};

struct ConvRun {
  const ConvWeights* w;
  const ConvGeometry* g;
  const float* x;
  const float* bias;
  float* y;
  KernelIsa isa;
  uint64_t positions;  // OH * OW
  // Pointwise (1x1, stride 1, no padding): the input planes are read in
  // place as one flat row of positions; only a last partial vector reads a
  // copy (`tail`), since it would run past the input's end.
  bool pointwise = false;
  PaddedInput layout;
  std::vector<float> padded;
  std::vector<uint64_t> element_offsets;  // per kernel element k = (c * kh + i) * kw + j
  std::vector<OutputVector> vectors;      // full vectors read from `source`
  std::vector<float> tail;                // pointwise: [C/group][kVector]
  std::vector<uint64_t> tail_offsets;
  OutputVector tail_vector{0, 0, 0};     // width 0: none
  uint64_t vectors_per_task = 1;
  uint64_t main_tasks = 0;
  // The current (image, group).
  uint64_t image = 0, group = 0;
  const float* source = nullptr;
};

// Task c: channel c of the current (image, group) into the padded input.
void PadTask(void* context, size_t task) {
  ConvRun& run = *static_cast<ConvRun*>(context);
  const ConvWeights& w = *run.w;
  const ConvGeometry& g = *run.g;
  const PaddedInput& p = run.layout;
  const uint64_t channel = run.group * w.in_channels_per_group + task;
  const float* plane = run.x + (run.image * g.in_channels + channel) * g.in_h * g.in_w;
  float* out = run.padded.data() + task * p.rows * p.row_floats;
  const int64_t in_h = static_cast<int64_t>(g.in_h), in_w = static_cast<int64_t>(g.in_w);
  const uint64_t sw = static_cast<uint64_t>(w.stride_w);
  for (uint64_t r = 0; r < p.rows; ++r, out += p.row_floats) {
    std::memset(out, 0, static_cast<size_t>(p.row_floats) * sizeof(float));
    const int64_t ih = static_cast<int64_t>(r) - g.pad_top;
    if (ih < 0 || ih >= in_h) continue;
    const float* src = plane + ih * in_w;
    // Padded column q holds input column q - pad_left.
    const int64_t q_begin = std::max<int64_t>(0, g.pad_left);
    const int64_t q_end = std::min<int64_t>(static_cast<int64_t>(p.columns), in_w + g.pad_left);
    if (sw == 1) {
      if (q_end > q_begin)
        std::memcpy(out + q_begin, src + (q_begin - g.pad_left), static_cast<size_t>(q_end - q_begin) * sizeof(float));
      continue;
    }
    for (uint64_t phase = 0; phase < sw; ++phase) {
      float* dst = out + phase * p.phase_floats;
      uint64_t e = 0;
      int64_t q = static_cast<int64_t>(phase);
      for (; q < q_begin; q += static_cast<int64_t>(sw)) ++e;
      for (; q < q_end; q += static_cast<int64_t>(sw)) dst[e++] = src[q - g.pad_left];
    }
  }
}

// ---------------------------------------------------------------- index-layout kernels

#ifdef ONNX_DC_CONV_AVX2
__attribute__((target("avx2,fma"))) inline void StoreVector(float* out, const OutputVector& vector, __m256 value) {
  if (vector.width == kVector) {
    _mm256_storeu_ps(out + vector.output_offset, value);
  } else {
    alignas(32) float tile[kVector];
    _mm256_store_ps(tile, value);
    std::memcpy(out + vector.output_offset, tile, static_cast<size_t>(vector.width) * sizeof(float));
  }
}
#endif

// Index layout: for kVectors vectors, every output channel of the group in
// turn: out = init + sum over the channel's run of codebook[code] * input(k, position).
template <unsigned kVectors>
void ChannelsGeneric(const ConvRun& run, Source source, const OutputVector* vectors) {
  const ConvWeights& w = *run.w;
  const uint64_t per_group = w.out_channels / w.group;
  const float* codebook = w.codebook.data();
  for (uint64_t m = run.group * per_group; m < (run.group + 1) * per_group; ++m) {
    const float init = run.bias != nullptr ? run.bias[m] : 0.0f;
    float acc[kVectors][kVector];
    for (unsigned v = 0; v < kVectors; ++v)
      for (unsigned q = 0; q < kVector; ++q) acc[v][q] = init;
    for (uint64_t e = w.channel_offsets[m]; e < w.channel_offsets[m + 1]; ++e) {
      const float weight = codebook[w.entries[e] & 0xffu];
      const uint64_t offset = source.offsets[w.entries[e] >> 8];
      for (unsigned v = 0; v < kVectors; ++v) {
        const float* column = source.data + vectors[v].input_offset + offset;
        for (unsigned q = 0; q < kVector; ++q) acc[v][q] += weight * column[q];
      }
    }
    float* out = run.y + (run.image * w.out_channels + m) * run.positions;
    for (unsigned v = 0; v < kVectors; ++v)
      std::memcpy(out + vectors[v].output_offset, acc[v], static_cast<size_t>(vectors[v].width) * sizeof(float));
  }
}

#ifdef ONNX_DC_CONV_AVX2
template <unsigned kVectors>
__attribute__((target("avx2,fma"))) void ChannelsAvx2(const ConvRun& run, Source source, const OutputVector* vectors) {
  const ConvWeights& w = *run.w;
  const uint64_t per_group = w.out_channels / w.group;
  const float* codebook = w.codebook.data();
  const uint32_t* entries = w.entries.data();
  const float* bases[kVectors];
  for (unsigned v = 0; v < kVectors; ++v) bases[v] = source.data + vectors[v].input_offset;
  for (uint64_t m = run.group * per_group; m < (run.group + 1) * per_group; ++m) {
    __m256 acc[kVectors];
    const __m256 init = _mm256_set1_ps(run.bias != nullptr ? run.bias[m] : 0.0f);
    for (unsigned v = 0; v < kVectors; ++v) acc[v] = init;
    const uint64_t end = w.channel_offsets[m + 1];
    for (uint64_t e = w.channel_offsets[m]; e < end; ++e) {
      const __m256 weight = _mm256_broadcast_ss(codebook + (entries[e] & 0xffu));
      const uint64_t offset = source.offsets[entries[e] >> 8];
      for (unsigned v = 0; v < kVectors; ++v)
        acc[v] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(bases[v] + offset), acc[v]);
    }
    float* out = run.y + (run.image * w.out_channels + m) * run.positions;
    for (unsigned v = 0; v < kVectors; ++v) StoreVector(out, vectors[v], acc[v]);
  }
}
#endif

using ChannelsFn = void (*)(const ConvRun&, Source, const OutputVector*);

template <unsigned kVectors>
ChannelsFn ChannelsKernelFor(KernelIsa isa) {
#ifdef ONNX_DC_CONV_AVX2
  if (isa == KernelIsa::kAvx2) return &ChannelsAvx2<kVectors>;
#endif
  return &ChannelsGeneric<kVectors>;
}

ChannelsFn ChannelsKernel(KernelIsa isa, uint64_t vectors) {
  switch (vectors) {
    case 1:
      return ChannelsKernelFor<1>(isa);
    case 2:
      return ChannelsKernelFor<2>(isa);
    case 3:
      return ChannelsKernelFor<3>(isa);
    case 4:
      return ChannelsKernelFor<4>(isa);
    case 5:
      return ChannelsKernelFor<5>(isa);
    case 6:
      return ChannelsKernelFor<6>(isa);
    case 7:
      return ChannelsKernelFor<7>(isa);
    default:
      return ChannelsKernelFor<kMaxChannelVectors>(isa);
  }
}

// Runs the kernels of the weight's layout on `count` vectors (at most
// vectors_per_task) from one source.
void RunVectors(const ConvRun& run, Source source, const OutputVector* vectors, uint64_t count) {
  ChannelsKernel(run.isa, count)(run, source, vectors);
}

// Task t < main_tasks: vectors [t * vectors_per_task, ...) of the current
// (image, group); task main_tasks: the pointwise tail vector.
void VectorsTask(void* context, size_t task) {
  const ConvRun& run = *static_cast<const ConvRun*>(context);
  if (task == run.main_tasks) {
    RunVectors(run, Source{run.tail.data(), run.tail_offsets.data()}, &run.tail_vector, 1);
    return;
  }
  const uint64_t first = task * run.vectors_per_task;
  const uint64_t count = std::min<uint64_t>(run.vectors_per_task, run.vectors.size() - first);
  RunVectors(run, Source{run.source, run.element_offsets.data()}, run.vectors.data() + first, count);
}

}  // namespace

bool ParseAutoPad(const std::string& text, AutoPad* out, std::string* error) {
  if (text.empty() || text == "NOTSET") {
    *out = AutoPad::kNotSet;
  } else if (text == "VALID") {
    *out = AutoPad::kValid;
  } else if (text == "SAME_UPPER") {
    *out = AutoPad::kSameUpper;
  } else if (text == "SAME_LOWER") {
    *out = AutoPad::kSameLower;
  } else {
    *error = "attribute auto_pad must be NOTSET, VALID, SAME_UPPER or SAME_LOWER, got '" + text + "'";
    return false;
  }
  return true;
}

size_t ConvWeights::memory_bytes() const {
  return sizeof(*this) + codebook.capacity() * sizeof(float) + channel_offsets.capacity() * sizeof(uint64_t) +
         entries.capacity() * sizeof(uint32_t) + codes.capacity() + pruned_mask.capacity();
}

const char* ConvLayoutName(ConvLayout layout) {
  switch (layout) {
    case ConvLayout::kIndex:
      return "index";
    case ConvLayout::kCodeTiles:
      return "code tiles";
    case ConvLayout::kDepthwise:
      return "depthwise";
  }
  return "?";
}

bool BuildConvWeights(const DecodedContainer& decoded, const ConvAttributes& attributes, GemmIsa isa,
                      ConvWeights* out, std::string* error) {
  const ContainerInfo& info = decoded.info;
  if (info.dtype != DType::kFloat32) {
    *error = std::string("the weight must be float32, the container holds ") + DTypeName(info.dtype);
    return false;
  }
  if (info.dims.size() != 4) {
    *error = "DCConv runs 2-D convolutions: the weight must be 4-D [M, C/group, kh, kw], the container holds a " +
             std::to_string(info.dims.size()) + "-D tensor";
    return false;
  }
  for (uint64_t d : info.dims) {
    if (d == 0) {
      *error = "the weight's shape has a zero dimension";
      return false;
    }
  }
  ConvWeights& w = *out;
  w.out_channels = info.dims[0];
  w.in_channels_per_group = info.dims[1];
  w.kernel_h = info.dims[2];
  w.kernel_w = info.dims[3];
  w.patch_size = w.in_channels_per_group * w.kernel_h * w.kernel_w;  // <= numel <= 2^30
  if (w.patch_size >= kMaxPatch) {
    *error = "the weight has " + std::to_string(w.patch_size) + " values per output channel, DCConv takes fewer than 2^24";
    return false;
  }
  if (attributes.group < 1 || attributes.group >= kMaxAttribute) {
    *error = "attribute group must be >= 1, got " + std::to_string(attributes.group);
    return false;
  }
  w.group = static_cast<uint64_t>(attributes.group);
  if (w.out_channels % w.group != 0) {
    *error = "the weight's " + std::to_string(w.out_channels) + " output channels are not a multiple of group = " +
             std::to_string(w.group);
    return false;
  }
  if (!attributes.kernel_shape.empty()) {
    const std::vector<int64_t> expected = {static_cast<int64_t>(w.kernel_h), static_cast<int64_t>(w.kernel_w)};
    if (attributes.kernel_shape != expected) {
      *error = "attribute kernel_shape = " + VectorString(attributes.kernel_shape) + " does not match the weight's " +
               VectorString(expected);
      return false;
    }
  }
  int64_t strides[2] = {1, 1}, dilations[2] = {1, 1};
  if (!ReadAttribute("strides", attributes.strides, 2, 1, strides, error)) return false;
  if (!ReadAttribute("dilations", attributes.dilations, 2, 1, dilations, error)) return false;
  if (!ReadAttribute("pads", attributes.pads, 4, 0, w.pads, error)) return false;
  w.stride_h = strides[0];
  w.stride_w = strides[1];
  w.dilation_h = dilations[0];
  w.dilation_w = dilations[1];
  w.auto_pad = attributes.auto_pad;
  if (w.auto_pad != AutoPad::kNotSet) std::fill(w.pads, w.pads + 4, int64_t{0});  // ignored, as onnxruntime does

  // Codebook (at most 256 values: bits <= 8) as float32, padded to 256.
  const uint32_t zero_symbol = info.codebook_size;
  if (info.codebook_size > 256 || decoded.codebook.size() < size_t{info.codebook_size} * sizeof(float)) {
    *error = "the codebook has more than 256 values";
    return false;
  }
  w.codebook.assign(256, 0.0f);
  if (info.codebook_size > 0) std::memcpy(w.codebook.data(), decoded.codebook.data(), info.codebook_size * sizeof(float));
  uint64_t kept = 0;
  uint32_t limit = 1;
  for (uint16_t code : decoded.codes) {
    if (code != zero_symbol) {
      ++kept;
      limit = std::max<uint32_t>(limit, uint32_t{code} + 1);
    }
  }
  w.kept = kept;
  // Code width: 4 bits (two indices per byte) when every kept index is below
  // 16, else a byte. The index of pruned weights in the code layouts: the zero
  // symbol (its codebook entry is +0.0) when it fits the width, else a value
  // that is exactly 0; without one (e.g. a full 256-value codebook without 0,
  // or 4-bit codes of pruned weights), pruned weights keep index 0 and a bit
  // mask (1 bit per weight, the codes' order) zeroes them when decoded.
  const bool pruned = kept < info.numel;
  const bool nibbles = limit <= 16;
  const uint32_t width_limit = nibbles ? 16 : 256;
  bool zero_found = zero_symbol < width_limit;
  uint32_t zero_code = zero_symbol;
  if (!zero_found) {
    for (uint32_t i = 0; i < std::min<uint32_t>(width_limit, info.codebook_size); ++i) {
      if (w.codebook[i] == 0.0f) {
        zero_code = i;
        zero_found = true;
        break;
      }
    }
  }
  const bool masked = pruned && !zero_found;
  if (!masked && pruned) limit = std::max<uint32_t>(limit, zero_code + 1);
  if (masked) zero_code = 0;
  const uint64_t per_group = w.out_channels / w.group;
  if (w.in_channels_per_group == 1 && w.group > 1) {
    w.layout = ConvLayout::kDepthwise;
  } else if (static_cast<double>(kept) >= kConvIndexKeptFraction * static_cast<double>(info.numel)) {
    w.layout = ConvLayout::kCodeTiles;
  } else {
    w.layout = ConvLayout::kIndex;
  }
  w.entries.clear();
  w.channel_offsets.clear();
  w.codes.clear();
  const bool index = w.layout == ConvLayout::kIndex;
  w.nibbles = !index && nibbles;
  if (index) {
    w.entries.reserve(static_cast<size_t>(kept));
    w.channel_offsets.assign(static_cast<size_t>(w.out_channels + 1), 0);
  } else {
    w.code_limit = limit;
    const uint8_t fill = static_cast<uint8_t>(pruned ? zero_code : 0);
    if (w.nibbles) {
      w.codes.assign(static_cast<size_t>((info.numel + 1) / 2), static_cast<uint8_t>(fill | (fill << 4)));
    } else {
      w.codes.assign(static_cast<size_t>(info.numel), fill);
    }
    if (masked) w.pruned_mask.assign(static_cast<size_t>((info.numel + 7) / 8), 0xFF);  // cleared where kept
  }
  // Index `code` of weight `at` (the codes' order).
  auto put = [&w](uint64_t at, uint16_t code) {
    if (w.nibbles) {
      uint8_t& byte = w.codes[static_cast<size_t>(at / 2)];
      const unsigned shift = 4 * static_cast<unsigned>(at % 2);
      byte = static_cast<uint8_t>((byte & ~(0xFu << shift)) | (unsigned{code} << shift));
    } else {
      w.codes[static_cast<size_t>(at)] = static_cast<uint8_t>(code);
    }
  };
  const bool sparse = info.layout == Layout::kSparse;
  uint64_t position = 0;  // flat index of the current entry
  for (uint64_t e = 0; e < info.entries; ++e, ++position) {
    if (sparse) position += decoded.gaps[e];  // the decoder checked every position < numel
    const uint16_t code = decoded.codes[e];
    if (code == zero_symbol) continue;
    const uint64_t m = position / w.patch_size, k = position % w.patch_size;
    if (index) {
      // Entries in flat (row-major [M, patch]) order are already channel by channel, k ascending.
      w.channel_offsets[m + 1]++;
      w.entries.push_back(static_cast<uint32_t>((k << 8) | code));
    } else if (w.layout == ConvLayout::kDepthwise) {
      put(position, code);
      if (masked) w.pruned_mask[position / 8] &= static_cast<uint8_t>(~(1u << (position % 8)));
    } else {
      // Tile of kConvTileRows channels of the group starting at `first`: [K][rows].
      const uint64_t in_group = m % per_group;
      const uint64_t first = in_group / kConvTileRows * kConvTileRows;
      const uint64_t rows = std::min<uint64_t>(kConvTileRows, per_group - first);
      const uint64_t at = (m - in_group + first) * w.patch_size + k * rows + (in_group - first);
      put(at, code);
      if (masked) w.pruned_mask[at / 8] &= static_cast<uint8_t>(~(1u << (at % 8)));
    }
  }
  if (index) {
    for (uint64_t m = 0; m < w.out_channels; ++m) w.channel_offsets[m + 1] += w.channel_offsets[m];
  }
  w.plane_order = !index && !w.nibbles && isa >= GemmIsa::kAvx512Vbmi && w.code_limit > 64 &&
                  (w.layout == ConvLayout::kDepthwise || info.numel <= kConvWholeDecode);
  if (w.plane_order) {
    w.codes.resize((w.codes.size() + 63) / 64 * 64, 0);
    if (!w.pruned_mask.empty()) w.pruned_mask.resize(w.codes.size() / 8, 0);
    uint8_t chunk[64];
    for (size_t c = 0; c < w.codes.size(); c += 64) {
      for (unsigned j = 0; j < 64; ++j) {
        const unsigned q = j / 16, l = (j / 4) % 4, e = j % 4;
        chunk[16 * l + 4 * q + e] = w.codes[c + j];
      }
      std::memcpy(w.codes.data() + c, chunk, 64);
    }
  }
  return true;
}

bool ComputeConvGeometry(const ConvWeights& w, const std::vector<int64_t>& x_dims, ConvGeometry* out,
                         std::string* error) {
  if (x_dims.size() != 4) {
    *error = "input X must be 4-D [N, C, H, W], got shape " + VectorString(x_dims);
    return false;
  }
  for (int64_t d : x_dims) {
    if (d < 0 || d >= kMaxSpatial) {
      *error = "input X has an invalid shape " + VectorString(x_dims);
      return false;
    }
  }
  ConvGeometry& g = *out;
  g.batch = static_cast<uint64_t>(x_dims[0]);
  g.in_channels = static_cast<uint64_t>(x_dims[1]);
  g.in_h = static_cast<uint64_t>(x_dims[2]);
  g.in_w = static_cast<uint64_t>(x_dims[3]);
  if (g.in_channels != w.group * w.in_channels_per_group) {
    *error = "input X has shape " + VectorString(x_dims) + ": its " + std::to_string(g.in_channels) +
             " channels must be group * weight's C/group = " + std::to_string(w.group) + " * " +
             std::to_string(w.in_channels_per_group);
    return false;
  }
  if (!AxisGeometry(x_dims[2], static_cast<int64_t>(w.kernel_h), w.stride_h, w.dilation_h, w.pads[0], w.pads[2],
                    w.auto_pad, "height", &g.out_h, &g.pad_top, error))
    return false;
  if (!AxisGeometry(x_dims[3], static_cast<int64_t>(w.kernel_w), w.stride_w, w.dilation_w, w.pads[1], w.pads[3],
                    w.auto_pad, "width", &g.out_w, &g.pad_left, error))
    return false;
  // Row and element counts must not overflow (onnxruntime refuses such an
  // output anyway; this keeps the index arithmetic exact).
  const uint64_t positions = g.out_h * g.out_w;  // each < 2^40
  if ((g.out_h != 0 && positions / g.out_h != g.out_w) ||
      (positions != 0 && g.batch > (uint64_t{1} << 62) / positions / std::max<uint64_t>(1, w.out_channels))) {
    *error = "the output of input shape " + VectorString(x_dims) + " is too large";
    return false;
  }
  return true;
}

namespace {

// The index layout: the direct kernels above.
std::string RunIndexConv(const ConvWeights& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                         KernelIsa isa, ParallelForFn parallel_for, void* runner) {
  const uint64_t per_group = w.out_channels / w.group;
  if (g.batch == 0 || g.out_h == 0 || g.out_w == 0 || per_group == 0) return std::string();
  ConvRun run;
  run.w = &w;
  run.g = &g;
  run.x = x;
  run.bias = bias;
  run.y = y;
  run.isa = isa;
  run.positions = g.out_h * g.out_w;
  run.pointwise = w.kernel_h == 1 && w.kernel_w == 1 && w.stride_h == 1 && w.stride_w == 1 && g.pad_top == 0 &&
                  g.pad_left == 0 && g.out_h == g.in_h && g.out_w == g.in_w;
  const uint64_t cg = w.in_channels_per_group;
  run.element_offsets.resize(static_cast<size_t>(w.patch_size));
  if (run.pointwise) {
    // Flat positions; the input plane of channel c starts c * positions after the group's first.
    for (uint64_t c = 0; c < cg; ++c) run.element_offsets[c] = c * run.positions;
    const uint64_t full = run.positions / kVector;
    run.vectors.resize(static_cast<size_t>(full));
    for (uint64_t v = 0; v < full; ++v) run.vectors[v] = OutputVector{v * kVector, v * kVector, kVector};
    if (run.positions % kVector != 0) {
      run.tail.assign(static_cast<size_t>(cg * kVector), 0.0f);
      run.tail_offsets.resize(static_cast<size_t>(cg));
      for (uint64_t c = 0; c < cg; ++c) run.tail_offsets[c] = c * kVector;
      run.tail_vector = OutputVector{0, full * kVector, run.positions % kVector};
    }
  } else {
    // Padded input: the rows and columns the output reads (< 2^42 each, see ComputeConvGeometry).
    const uint64_t sh = static_cast<uint64_t>(w.stride_h), sw = static_cast<uint64_t>(w.stride_w);
    const uint64_t dh = static_cast<uint64_t>(w.dilation_h), dw = static_cast<uint64_t>(w.dilation_w);
    PaddedInput& p = run.layout;
    p.rows = (g.out_h - 1) * sh + (w.kernel_h - 1) * dh + 1;
    p.columns = (g.out_w - 1) * sw + (w.kernel_w - 1) * dw + 1;
    p.phase_floats = (p.columns + sw - 1) / sw + kVector;
    p.row_floats = sw * p.phase_floats;
    const uint64_t plane_floats = p.rows * p.row_floats;
    if (p.row_floats / sw != p.phase_floats || plane_floats / p.rows != p.row_floats ||
        plane_floats > kMaxPaddedFloats / cg)
      return "the padded input (" + std::to_string(cg) + " channels of " + std::to_string(p.rows) + " x " +
             std::to_string(p.columns) + ") is larger than 2^28 values; check the pads and strides";
    run.padded.resize(static_cast<size_t>(cg * plane_floats));
    // Offset of kernel element (c, i, j) from an output position's origin.
    uint64_t k = 0;
    for (uint64_t c = 0; c < cg; ++c) {
      for (uint64_t i = 0; i < w.kernel_h; ++i) {
        for (uint64_t j = 0; j < w.kernel_w; ++j) {
          const uint64_t column = j * dw;
          run.element_offsets[k++] =
              c * plane_floats + i * dh * p.row_floats + (column % sw) * p.phase_floats + column / sw;
        }
      }
    }
    // Output vectors, row by row (an output row's last vector may be partial).
    const uint64_t per_row = (g.out_w + kVector - 1) / kVector;
    run.vectors.resize(static_cast<size_t>(g.out_h * per_row));
    for (uint64_t oh = 0, v = 0; oh < g.out_h; ++oh) {
      for (uint64_t ow = 0; ow < g.out_w; ow += kVector, ++v) {
        run.vectors[v] = OutputVector{oh * sh * p.row_floats + ow, oh * g.out_w + ow, std::min(kVector, g.out_w - ow)};
      }
    }
    run.source = run.padded.data();
  }
  // One register set of vectors per task.
  run.vectors_per_task = kMaxChannelVectors;
  run.main_tasks = (run.vectors.size() + run.vectors_per_task - 1) / run.vectors_per_task;
  const size_t tasks = static_cast<size_t>(run.main_tasks + (run.tail_vector.width > 0 ? 1 : 0));
  for (run.image = 0; run.image < g.batch; ++run.image) {
    for (run.group = 0; run.group < w.group; ++run.group) {
      std::string error;
      if (run.pointwise) {
        run.source = x + (run.image * g.in_channels + run.group * cg) * run.positions;
        if (run.tail_vector.width > 0) {
          for (uint64_t c = 0; c < cg; ++c) {
            std::memcpy(run.tail.data() + c * kVector, run.source + c * run.positions + run.tail_vector.output_offset,
                        static_cast<size_t>(run.tail_vector.width) * sizeof(float));
          }
        }
      } else {
        error = parallel_for(runner, static_cast<size_t>(cg), &PadTask, &run);
      }
      if (error.empty()) error = parallel_for(runner, tasks, &VectorsTask, &run);
      if (!error.empty()) return error;
    }
  }
  return std::string();
}

// ---------------------------------------------------------------- depthwise

struct DepthwiseRun {
  const DepthwiseJob* job;
  void (*fn)(const DepthwiseJob&, uint64_t);
};

void DepthwiseTask(void* context, size_t task) {
  const DepthwiseRun& run = *static_cast<const DepthwiseRun*>(context);
  run.fn(*run.job, task);
}

std::string RunDepthwiseConv(const ConvWeights& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                             const ActivationSpec& activation, GemmIsa isa, ParallelForFn parallel_for,
                             void* runner) {
  DepthwiseJob job;
  const uint64_t taps = w.kernel_h * w.kernel_w;
  // Decoded once per call (tiny); plane order: whole chunks of 64.
  const uint64_t weight_count = w.out_channels * taps;
  std::vector<float> weights(static_cast<size_t>(w.plane_order ? w.codes.size() : weight_count));
  (w.plane_order            ? &avx512::ExpandConvCodesVbmi
   : isa >= GemmIsa::kAvx512 ? &avx512::ExpandConvCodes
   : isa == GemmIsa::kAvx2   ? &avx2::ExpandConvCodes
                             : &generic::ExpandConvCodes)(w.codes.data(), 0, weights.size(), w.nibbles,
                                                          w.codebook.data(), w.code_limit,
                                                          w.pruned_mask.empty() ? nullptr : w.pruned_mask.data(),
                                                          weights.data());
  job.x = x;
  job.weights = weights.data();
  job.bias = bias;
  job.y = y;
  job.channels = w.out_channels;
  job.multiplier = w.out_channels / w.group;
  job.in_channels = g.in_channels;
  job.in_h = g.in_h;
  job.in_w = g.in_w;
  job.out_h = g.out_h;
  job.out_w = g.out_w;
  job.kernel_h = w.kernel_h;
  job.kernel_w = w.kernel_w;
  job.stride_h = w.stride_h;
  job.stride_w = w.stride_w;
  job.dilation_h = w.dilation_h;
  job.dilation_w = w.dilation_w;
  job.pad_top = g.pad_top;
  job.pad_left = g.pad_left;
  job.activation = activation;
  // A task's padded rows: about 32K floats (in L1 / L2), at least one output row.
  const uint64_t sh = static_cast<uint64_t>(w.stride_h), sw = static_cast<uint64_t>(w.stride_w);
  const uint64_t columns = (g.out_w - 1) * sw + (w.kernel_w - 1) * static_cast<uint64_t>(w.dilation_w) + 1;
  const uint64_t row_floats = sw * ((columns + sw - 1) / sw + 64);
  const uint64_t halo = (w.kernel_h - 1) * static_cast<uint64_t>(w.dilation_h) + 1;
  if (row_floats > kMaxPaddedFloats || halo > kMaxPaddedFloats || halo + sh > kMaxPaddedFloats / row_floats)
    return "the padded input rows of a depthwise task (" + std::to_string(halo) + " x " + std::to_string(columns) +
           ") are larger than 2^28 values; check the pads, strides and dilations";
  job.rows_per_task = std::max<uint64_t>(1, std::min<uint64_t>(g.out_h, 32768 / (row_floats * sh)));
  job.tasks_per_plane = (g.out_h + job.rows_per_task - 1) / job.rows_per_task;
  // Channels per task: about 8K outputs of work per task (small planes share a task).
  job.channels_per_task =
      std::max<uint64_t>(1, std::min<uint64_t>(w.out_channels, 8192 / (job.rows_per_task * g.out_w)));
  DepthwiseRun run{&job, isa >= GemmIsa::kAvx512 ? &avx512::RunDepthwise
                         : isa == GemmIsa::kAvx2 ? &avx2::RunDepthwise
                                                 : &generic::RunDepthwise};
  const uint64_t channel_blocks = (w.out_channels + job.channels_per_task - 1) / job.channels_per_task;
  const uint64_t tasks = g.batch * channel_blocks * job.tasks_per_plane;
  return parallel_for(runner, static_cast<size_t>(tasks), &DepthwiseTask, &run);
}

// ---------------------------------------------------------------- code tiles

// Weights per decoding task.
constexpr uint64_t kDecodeChunk = uint64_t{1} << 14;

struct CodeTilesRun {
  const ConvWeights* w;
  void (*split2)(const float*, uint64_t, float*, float*);
  // Uninitialised buffers (every float is written before it is read).
  std::unique_ptr<float[]> decoded;
  uint64_t decoded_size = 0;
  void (*expand)(const uint8_t*, uint64_t, uint64_t, bool, const float*, uint32_t, const uint8_t*, float*);
  const ConvGeometry* g;
  const float* x;
  uint64_t image;
  // Padded input of the image (not pointwise): channel c at padded[c * plane].
  std::unique_ptr<float[]> padded;
  uint64_t rows = 0, row_floats = 0, phase_floats = 0, plane = 0;
  // Phases of a padded row: stride_w for the GEMM panels (contiguous vectors of an output row's
  // inputs), 1 for channels in lanes (scalar inputs at any stride: no split).
  uint64_t phases = 1;
  std::vector<ConvGemmJob> jobs;  // per group
  struct Task {
    uint64_t job, first, end;
    uint64_t block;  // channels-in-lanes: the block of channels
  };
  std::vector<Task> tasks;
  void (*fn)(const ConvGemmJob&, uint64_t, uint64_t);
  // Channels in lanes (instead of the GEMM panels): the weight as [ld / block][K][block]
  // floats per group, the bias padded to ld, one job per group.
  bool lanes = false;
  uint64_t ld = 0, lane_block = 0;
  std::unique_ptr<float[]> lane_weights;
  std::vector<float> lane_bias;
  std::vector<ConvLanesJob> lane_jobs;
  void (*lanes_fn)(const ConvLanesJob&, uint64_t, uint64_t, uint64_t);
  void (*lanes_decode)(const ConvLanesJob&, uint64_t, uint64_t, uint64_t, float*);
  std::vector<uint8_t> planes;  // byte-plane order: the codebook's byte planes (ConvCodePlanes)
  uint64_t lane_depth = 0;
};

// Padded columns [q_begin, q_end) of a row (src indexed by padded column)
// into its two stride-2 phases: column q to phase q % 2, element q / 2.
void SplitRowPhases2(void (*split2)(const float*, uint64_t, float*, float*), const float* src, int64_t q_begin,
                     int64_t q_end, float* even, float* odd) {
  int64_t q = q_begin;
  if (q < q_end && q % 2 != 0) {
    odd[q / 2] = src[q];
    ++q;
  }
  const uint64_t pairs = static_cast<uint64_t>(q_end - q) / 2;
  split2(src + q, pairs, even + q / 2, odd + q / 2);
  q += static_cast<int64_t>(2 * pairs);
  if (q < q_end) even[q / 2] = src[q];
}

// Task c: input channel c of the current image into the padded buffer (rows
// of row_floats; with run.phases > 1 split into phases of phase_floats).
void PadChannel(void* context, size_t c) {
  CodeTilesRun& run = *static_cast<CodeTilesRun*>(context);
  const ConvGeometry& g = *run.g;
  const float* plane = run.x + (run.image * g.in_channels + c) * g.in_h * g.in_w;
  float* out = run.padded.get() + c * run.plane;
  const int64_t in_h = static_cast<int64_t>(g.in_h), in_w = static_cast<int64_t>(g.in_w);
  const uint64_t sw = run.phases;
  const uint64_t columns = sw == 1 ? run.row_floats : run.phase_floats * sw;
  const int64_t q_begin = std::max<int64_t>(0, g.pad_left);
  const int64_t q_end = std::min<int64_t>(static_cast<int64_t>(columns), in_w + g.pad_left);
  for (uint64_t r = 0; r < run.rows; ++r, out += run.row_floats) {
    const int64_t ih = static_cast<int64_t>(r) - g.pad_top;
    if (ih < 0 || ih >= in_h || q_end <= q_begin) {
      std::memset(out, 0, static_cast<size_t>(run.row_floats) * sizeof(float));
      continue;
    }
    const float* src = plane + ih * in_w - g.pad_left;
    if (sw == 1) {
      // Zero the pads left and right of the copied columns only.
      std::memset(out, 0, static_cast<size_t>(q_begin) * sizeof(float));
      std::memcpy(out + q_begin, src + q_begin, static_cast<size_t>(q_end - q_begin) * sizeof(float));
      std::memset(out + q_end, 0, static_cast<size_t>(static_cast<int64_t>(run.row_floats) - q_end) * sizeof(float));
      continue;
    }
    std::memset(out, 0, static_cast<size_t>(run.row_floats) * sizeof(float));
    if (sw == 2) {
      SplitRowPhases2(run.split2, src, q_begin, q_end, out, out + run.phase_floats);
      continue;
    }
    for (uint64_t phase = 0; phase < sw; ++phase) {
      // Columns phase, phase + sw, ... from q_begin on.
      const uint64_t ub = static_cast<uint64_t>(q_begin);
      const uint64_t q0 = ub <= phase ? phase : phase + (ub - phase + sw - 1) / sw * sw;
      float* dst = out + phase * run.phase_floats + q0 / sw;
      for (int64_t q = static_cast<int64_t>(q0); q < q_end; q += static_cast<int64_t>(sw)) *dst++ = src[q];
    }
  }
}

void DecodeTask(void* context, size_t index) {
  CodeTilesRun& run = *static_cast<CodeTilesRun*>(context);
  const uint64_t first = uint64_t{index} * kDecodeChunk;
  const uint64_t count = std::min<uint64_t>(kDecodeChunk, run.decoded_size - first);
  run.expand(run.w->codes.data(), first, count, run.w->nibbles, run.w->codebook.data(), run.w->code_limit,
             run.w->pruned_mask.empty() ? nullptr : run.w->pruned_mask.data(), run.decoded.get() + first);
}

// A gathered panel whose runs are consecutive output positions filling all
// its lanes (e.g. whole output rows narrower than a panel) is stored in place.
ConvPanel FinishGathered(ConvPanel panel, const std::vector<ConvSegment>& segments) {
  panel.output = 0;
  panel.width = 0;
  const ConvSegment* runs = segments.data() + panel.first_segment;
  uint64_t lanes = 0;
  bool contiguous = true;
  for (uint64_t s = 0; s < panel.segments; ++s) {
    contiguous = contiguous && runs[s].output == runs[0].output + lanes && runs[s].lane == lanes;
    lanes += runs[s].width;
  }
  if (contiguous) {
    panel.output = runs[0].output;
    panel.width = static_cast<uint32_t>(lanes);
  }
  return panel;
}

void CodeTilesTask(void* context, size_t index) {
  const CodeTilesRun& run = *static_cast<const CodeTilesRun*>(context);
  const CodeTilesRun::Task& task = run.tasks[index];
  if (run.lanes) {
    run.lanes_fn(run.lane_jobs[task.job], task.block, task.first, task.end);
  } else {
    run.fn(run.jobs[task.job], task.first, task.end);
  }
}

// Task (group, block of channels, block of ConvLaneDepth() rows of K): the
// rows decoded into the group's [ld / B][K][B] channels-in-lanes weights (B =
// run.lane_block; zero lanes past the group's channels).
void LanesDecodeTask(void* context, size_t index) {
  CodeTilesRun& run = *static_cast<CodeTilesRun*>(context);
  const uint64_t k_count = run.w->patch_size;
  const uint64_t blocks = run.ld / run.lane_block;
  const uint64_t depths = (k_count + run.lane_depth - 1) / run.lane_depth;
  const uint64_t group = index / (blocks * depths), block = index / depths % blocks;
  const uint64_t k0 = index % depths * run.lane_depth, k1 = std::min(k_count, k0 + run.lane_depth);
  float* out = run.lane_weights.get() + group * k_count * run.ld + block * run.lane_block * k_count +
               k0 * run.lane_block;
  run.lanes_decode(run.lane_jobs[group], block, k0, k1, out);
}

// Whether a layer runs channels in lanes rather than the GEMM panels
// (measured: docs/OPERATORS.md, "DCConv: layouts and kernels"). A build can
// force it (-DONNX_DC_CONV_LANES=0: never, 2: wherever it can run).
bool ChannelLanesChosen(bool pointwise, uint64_t channels, uint64_t k_count, uint64_t out_w, uint64_t positions,
                        uint64_t nr, uint64_t lane_width) {
#ifndef ONNX_DC_CONV_LANES
#define ONNX_DC_CONV_LANES 1
#endif
  if (ONNX_DC_CONV_LANES == 0 || channels < lane_width) return false;
  if (ONNX_DC_CONV_LANES == 2) return true;
  // Rows narrower than a panel (every panel gathered, lanes wasted on the
  // rows' remainders) and at least 4 vectors of channels (AVX-512: 64); a
  // 1x1 stride-1 convolution reads its flat positions in place: only on
  // small maps (at most 192 positions, where the weight is decoded per task)
  // with at least 128 input channels (measured, per-node profiles: nudenet's
  // 1x1 layers at 10x10, K = 256-512: 0.08-0.30 ms -> 0.06-0.21 ms; no gain
  // at 20x20; ppocr-mobile-v2-cls's 1x1 16->88 and 32->200 on small maps,
  // K = 16-32: 15 -> 20 us and 26 -> 49 us, slower).
#ifndef ONNX_DC_CONV_POINTWISE_LANE_POSITIONS
#define ONNX_DC_CONV_POINTWISE_LANE_POSITIONS 192
#endif
  if (pointwise)
    return positions <= ONNX_DC_CONV_POINTWISE_LANE_POSITIONS && k_count >= 128 && channels >= 4 * lane_width;
  return out_w < nr && channels >= 4 * lane_width;
}

std::string RunCodeTilesConv(const ConvWeights& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                             const ActivationSpec& activation, GemmIsa isa, ParallelForFn parallel_for,
                             void* runner) {
  const uint64_t nr = isa >= GemmIsa::kAvx512 ? avx512::ConvPanelWidth()
                      : isa == GemmIsa::kAvx2 ? avx2::ConvPanelWidth()
                                              : generic::ConvPanelWidth();
  CodeTilesRun run;
  run.w = &w;
  run.g = &g;
  run.x = x;
  run.fn = isa >= GemmIsa::kAvx512 ? &avx512::RunConvGemm : isa == GemmIsa::kAvx2 ? &avx2::RunConvGemm
                                                                                  : &generic::RunConvGemm;
  run.split2 = isa >= GemmIsa::kAvx512 ? &avx512::SplitPhases2 : isa == GemmIsa::kAvx2 ? &avx2::SplitPhases2
                                                                                    : &generic::SplitPhases2;
  run.expand = w.plane_order ? &avx512::ExpandConvCodesVbmi
               : isa >= GemmIsa::kAvx512 ? &avx512::ExpandConvCodes
               : isa == GemmIsa::kAvx2 ? &avx2::ExpandConvCodes
                                       : &generic::ExpandConvCodes;
  // Codes to decode: every weight (plane order: padded to 64).
  const uint64_t code_count = w.plane_order ? w.codes.size() : w.out_channels * w.patch_size;
  const uint64_t positions = g.out_h * g.out_w;
  const uint64_t per_group = w.out_channels / w.group, cg = w.in_channels_per_group, k_count = w.patch_size;
  const bool pointwise = w.kernel_h == 1 && w.kernel_w == 1 && w.stride_h == 1 && w.stride_w == 1 &&
                         g.pad_top == 0 && g.pad_left == 0 && g.out_h == g.in_h && g.out_w == g.in_w;
  const bool few = positions * 4 <= nr;
  const uint64_t lane_width = isa >= GemmIsa::kAvx512 ? avx512::ConvLaneWidth()
                              : isa == GemmIsa::kAvx2 ? avx2::ConvLaneWidth()
                                                      : generic::ConvLaneWidth();
  const uint64_t lane_block = isa >= GemmIsa::kAvx512 ? avx512::ConvLaneBlock()
                              : isa == GemmIsa::kAvx2 ? avx2::ConvLaneBlock()
                                                      : generic::ConvLaneBlock();
  // Channels in lanes: the weight decoded whole into its [ld / block][K][block] layout (at
  // most kConvWholeDecode floats with the zero lanes) when each block of channels is read by
  // more than kLaneDecodeTasks tasks, else decoded by each task into L1 as it goes; the GEMM
  // panels: in the codes' order.
  const uint64_t lane_floats = w.group * k_count * ((per_group + lane_block - 1) / lane_block * lane_block);
  run.lanes = !few && ChannelLanesChosen(pointwise, per_group, k_count, g.out_w, positions, nr, lane_width);
  if (!run.lanes && code_count <= kConvWholeDecode) {
    run.decoded.reset(new float[code_count]);
    run.decoded_size = code_count;
    const std::string error = parallel_for(
        runner, static_cast<size_t>((code_count + kDecodeChunk - 1) / kDecodeChunk), &DecodeTask, &run);
    if (!error.empty()) return error;
  }
  const uint64_t sh = static_cast<uint64_t>(w.stride_h), sw = static_cast<uint64_t>(w.stride_w);
  const uint64_t dh = static_cast<uint64_t>(w.dilation_h), dw = static_cast<uint64_t>(w.dilation_w);
  std::vector<uint64_t> offsets(static_cast<size_t>(k_count));
  if (pointwise) {
    for (uint64_t c = 0; c < cg; ++c) offsets[c] = c * positions;
  } else {
    // The rows and columns the output reads (< 2^42 each, see ComputeConvGeometry).
    run.rows = (g.out_h - 1) * sh + (w.kernel_h - 1) * dh + 1;
    const uint64_t columns = (g.out_w - 1) * sw + (w.kernel_w - 1) * dw + 1;
    const uint64_t phases = run.lanes ? 1 : sw;
    run.phases = phases;
    run.phase_floats = (columns + phases - 1) / phases;
    run.row_floats = phases * run.phase_floats;
    run.plane = run.rows * run.row_floats;
    if (run.row_floats / phases != run.phase_floats || run.plane / run.rows != run.row_floats ||
        run.plane > kMaxPaddedFloats / g.in_channels)
      return "the padded input (" + std::to_string(g.in_channels) + " channels of " + std::to_string(run.rows) +
             " x " + std::to_string(columns) + ") is larger than 2^28 values; check the pads and strides";
    uint64_t k = 0;
    for (uint64_t c = 0; c < cg; ++c) {
      for (uint64_t i = 0; i < w.kernel_h; ++i) {
        for (uint64_t j = 0; j < w.kernel_w; ++j) {
          const uint64_t column = j * dw;
          offsets[k++] = c * run.plane + i * dh * run.row_floats + (column % phases) * run.phase_floats + column / phases;
        }
      }
    }
    run.padded.reset(new float[static_cast<size_t>(g.in_channels * run.plane)]);  // every float written by PadChannel
  }
  // Panels of nr consecutive output positions (the same for every image and
  // group): pointwise, X read in place (the last partial panel from a copy);
  // otherwise gathered from the padded input, one run per output row the
  // panel touches (output position (oh, ow) reads from oh * sh * row_floats + ow).
  std::vector<ConvPanel> panels;
  std::vector<ConvSegment> segments;
  std::vector<uint64_t> position_sources;
  std::vector<float> tails;  // pointwise: per group [K][nr], the last partial panel
  std::vector<uint64_t> tail_offsets;
  if (few || run.lanes) {
    position_sources.resize(static_cast<size_t>(positions));
    for (uint64_t oh = 0, p = 0; oh < g.out_h; ++oh) {
      for (uint64_t ow = 0; ow < g.out_w; ++ow, ++p)
        position_sources[p] = pointwise ? p : oh * sh * run.row_floats + ow * (sw / run.phases);
    }
  } else {
    if (pointwise) {
      for (uint64_t q = 0; q < positions; q += nr) {
        ConvPanel panel;
        panel.output = q;
        panel.width = static_cast<uint32_t>(std::min(nr, positions - q));
        panel.kind = panel.width < nr ? PanelSource::kTail : PanelSource::kInPlace;
        panel.source = q;
        panel.first_segment = 0;
        panel.segments = 0;
        panels.push_back(panel);
      }
    } else {
      // Whole panels of each output row read in place (oh * sh * row_floats
      // + ow); the rows' remainders are gathered into panels of nr lanes.
      ConvPanel gather{0, 0, PanelSource::kGather, 0, 0, 0};
      uint32_t lanes = 0;
      for (uint64_t oh = 0; oh < g.out_h; ++oh) {
        const uint64_t row_source = oh * sh * run.row_floats;
        uint64_t ow = 0;
        for (; ow + nr <= g.out_w; ow += nr)
          panels.push_back(ConvPanel{oh * g.out_w + ow, static_cast<uint32_t>(nr), PanelSource::kInPlace,
                                     row_source + ow, 0, 0});
        while (ow < g.out_w) {
          if (lanes == 0) {
            gather.first_segment = segments.size();
            gather.segments = 0;
          }
          const uint32_t width = static_cast<uint32_t>(std::min<uint64_t>(nr - lanes, g.out_w - ow));
          segments.push_back(ConvSegment{row_source + ow, oh * g.out_w + ow, lanes, width});
          ++gather.segments;
          lanes += width;
          ow += width;
          if (lanes == nr) {
            panels.push_back(FinishGathered(gather, segments));
            lanes = 0;
          }
        }
      }
      if (lanes > 0) panels.push_back(FinishGathered(gather, segments));
    }
    if (pointwise && positions % nr != 0) {
      tails.assign(static_cast<size_t>(w.group * k_count * nr), 0.0f);
      tail_offsets.resize(static_cast<size_t>(k_count));
      for (uint64_t k = 0; k < k_count; ++k) tail_offsets[k] = k * nr;
    }
  }
  if (run.lanes) {
    // Weights [ld / block][K][block] per group (ld: the channels rounded up to a block), the
    // bias padded to ld; tasks: a block of channels x up to 48 positions.
    run.ld = (per_group + lane_block - 1) / lane_block * lane_block;
    run.lane_block = lane_block;
    run.lanes_fn = isa >= GemmIsa::kAvx512 ? &avx512::RunConvLanes
                   : isa == GemmIsa::kAvx2 ? &avx2::RunConvLanes
                                           : &generic::RunConvLanes;
    run.lanes_decode = isa >= GemmIsa::kAvx512 ? &avx512::DecodeConvLanes
                       : isa == GemmIsa::kAvx2 ? &avx2::DecodeConvLanes
                                               : &generic::DecodeConvLanes;
    run.lane_depth = isa >= GemmIsa::kAvx512 ? avx512::ConvLaneDepth()
                     : isa == GemmIsa::kAvx2 ? avx2::ConvLaneDepth()
                                             : generic::ConvLaneDepth();
    if (bias != nullptr) {
      run.lane_bias.assign(static_cast<size_t>(w.group * run.ld), 0.0f);
      for (uint64_t group = 0; group < w.group; ++group)
        std::memcpy(run.lane_bias.data() + group * run.ld, bias + group * per_group,
                    static_cast<size_t>(per_group) * sizeof(float));
    }
    // Tasks of at most 96 positions, in equal multiples of 12 (whole tiles of 4 or 6 positions).
#ifndef ONNX_DC_CONV_LANE_TASK_POSITIONS
#define ONNX_DC_CONV_LANE_TASK_POSITIONS 96
#endif
    uint64_t position_tasks = (positions + ONNX_DC_CONV_LANE_TASK_POSITIONS - 1) / ONNX_DC_CONV_LANE_TASK_POSITIONS;
    // Few positions (at most 2 tasks' worth) and several blocks of channels: one task per block,
    // which decodes the block's weights into L1 once, as it goes (measured: a separate decode
    // pass, or a block decoded by two tasks, took 5-10 % longer on nudenet's 10x10 layers).
    // Otherwise the weight is decoded whole, once per call, when it fits kConvWholeDecode.
#ifndef ONNX_DC_CONV_LANE_DECODE_TASKS
#define ONNX_DC_CONV_LANE_DECODE_TASKS 2
#endif
    const uint64_t lane_blocks = w.group * (run.ld / lane_block);
    const bool in_task = (position_tasks <= ONNX_DC_CONV_LANE_DECODE_TASKS && lane_blocks >= 2) ||
                         lane_floats > kConvWholeDecode;
    if (in_task && position_tasks <= ONNX_DC_CONV_LANE_DECODE_TASKS) position_tasks = 1;
    const uint64_t per_task = ((positions + position_tasks - 1) / position_tasks + 11) / 12 * 12;
    const bool whole = !in_task;
    if (whole) run.lane_weights.reset(new float[static_cast<size_t>(lane_floats)]);
    run.lane_jobs.resize(static_cast<size_t>(w.group));
    const ConvExpandFn expand = run.expand;
    if (w.plane_order) {
      run.planes.resize(4 * 256);
      avx512::ConvCodePlanes(w.codebook.data(), run.planes.data());
    }
    for (uint64_t group = 0; group < w.group; ++group) {
      ConvLanesJob& job = run.lane_jobs[group];
      job.weights = whole ? run.lane_weights.get() + group * k_count * run.ld : nullptr;
      job.codes = w.codes.data();
      job.code_first = group * per_group * k_count;
      job.code_count = w.codes.size();
      job.nibbles = w.nibbles;
      job.plane_order = w.plane_order;
      job.codebook = w.codebook.data();
      job.code_limit = w.code_limit;
      job.pruned_mask = w.pruned_mask.empty() ? nullptr : w.pruned_mask.data();
      job.expand = expand;
      job.planes = w.plane_order ? run.planes.data() : nullptr;
      job.ld = run.ld;
      job.channels = per_group;
      job.k_count = k_count;
      job.bias = bias != nullptr ? run.lane_bias.data() + group * run.ld : nullptr;
      job.offsets = offsets.data();
      job.position_sources = position_sources.data();
      job.positions = positions;
      job.activation = activation;
      for (uint64_t block = 0; block < run.ld / lane_block; ++block) {
        for (uint64_t first = 0; first < positions; first += per_task)
          run.tasks.push_back(CodeTilesRun::Task{group, first, std::min(positions, first + per_task), block});
      }
    }
    if (whole) {
      const uint64_t depths = (k_count + run.lane_depth - 1) / run.lane_depth;
      const std::string error = parallel_for(runner, static_cast<size_t>(w.group * (run.ld / lane_block) * depths),
                                             &LanesDecodeTask, &run);
      if (!error.empty()) return error;
    }
  }
  // Tasks: a few panels of one group, so that their inputs (K x NR floats a
  // panel) stay in L2 while every tile of channels passes over them.
  const uint64_t count = few ? positions : panels.size();
  uint64_t per_task = few ? count : std::max<uint64_t>(1, std::min<uint64_t>(16, 65536 / (k_count * nr)));
  if (!few) per_task = std::min(per_task, std::max<uint64_t>(1, count / 8));
  run.jobs.resize(static_cast<size_t>(w.group));
  for (uint64_t group = 0; group < w.group; ++group) {
    ConvGemmJob& job = run.jobs[group];
    job.codes = w.codes.data();
    job.code_first = group * per_group * k_count;
    job.nibbles = w.nibbles;
    job.decoded = run.decoded ? run.decoded.get() + group * per_group * k_count : nullptr;
    job.codebook = w.codebook.data();
    job.code_limit = w.code_limit;
    job.pruned_mask = w.pruned_mask.empty() ? nullptr : w.pruned_mask.data();
    job.channels = per_group;
    job.k_count = k_count;
    job.offsets = offsets.data();
    job.tail_source = tails.empty() ? nullptr : tails.data() + group * k_count * nr;
    job.tail_offsets = tail_offsets.data();
    job.panels = panels.data();
    job.segments = segments.data();
    job.few_positions = few;
    job.position_sources = position_sources.data();
    job.positions = positions;
    job.bias = bias != nullptr ? bias + group * per_group : nullptr;
    job.activation = activation;
    for (uint64_t first = 0; first < count; first += per_task)
      if (!run.lanes) run.tasks.push_back(CodeTilesRun::Task{group, first, std::min(count, first + per_task), 0});
  }
  for (run.image = 0; run.image < g.batch; ++run.image) {
    std::string error;
    const float* image_x = x + run.image * g.in_channels * g.in_h * g.in_w;
    if (!pointwise) error = parallel_for(runner, static_cast<size_t>(g.in_channels), &PadChannel, &run);
    if (!error.empty()) return error;
    for (uint64_t group = 0; group < w.group; ++group) {
      ConvGemmJob& job = run.jobs[group];
      job.source = pointwise ? image_x + group * cg * positions : run.padded.get() + group * cg * run.plane;
      job.y = y + (run.image * w.out_channels + group * per_group) * positions;
      if (run.lanes) {
        run.lane_jobs[group].source = job.source;
        run.lane_jobs[group].y = job.y;
      }
      if (!tails.empty()) {
        const uint64_t first = positions / nr * nr;
        float* tail = tails.data() + group * k_count * nr;
        for (uint64_t k = 0; k < k_count; ++k)
          std::memcpy(tail + k * nr, job.source + k * positions + first,
                      static_cast<size_t>(positions - first) * sizeof(float));
      }
    }
    error = parallel_for(runner, run.tasks.size(), &CodeTilesTask, &run);
    if (!error.empty()) return error;
  }
  return std::string();
}

}  // namespace

std::string RunConv(const ConvWeights& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
                    const ActivationSpec& activation, KernelIsa isa, GemmIsa gemm_isa, ParallelForFn parallel_for,
                    void* runner) {
  if (g.batch == 0 || g.out_h == 0 || g.out_w == 0 || w.out_channels == 0) return std::string();
  switch (w.layout) {
    case ConvLayout::kDepthwise:
      return RunDepthwiseConv(w, g, x, bias, y, activation, gemm_isa, parallel_for, runner);
    case ConvLayout::kCodeTiles:
      return RunCodeTilesConv(w, g, x, bias, y, activation, gemm_isa, parallel_for, runner);
    case ConvLayout::kIndex:
      break;
  }
  std::string error = RunIndexConv(w, g, x, bias, y, isa, parallel_for, runner);
  // The direct kernels add the bias; other activations are a pass over Y.
  if (error.empty()) ApplyActivation(y, g.batch * w.out_channels * g.out_h * g.out_w, activation, gemm_isa);
  return error;
}

}  // namespace onnx_dc
