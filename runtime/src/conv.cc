// 2-D convolution on a compressed weight: input padding and the kernels
// (see conv.h for the layout and the reasons).
#include "conv.h"

#include <algorithm>
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

// Output pointers and initial values of the kConvBlockChannels lanes of
// block `block` of the current group (null for padding lanes).
void BlockLanes(const ConvRun& run, uint64_t block, float* init, float** out) {
  const ConvWeights& w = *run.w;
  const uint64_t per_group = w.out_channels / w.group;
  for (uint64_t r = 0; r < kConvBlockChannels; ++r) {
    const uint64_t in_group = block * kConvBlockChannels + r;
    const uint64_t m = run.group * per_group + in_group;
    const bool real = in_group < per_group;
    init[r] = real && run.bias != nullptr ? run.bias[m] : 0.0f;
    out[r] = real ? run.y + (run.image * w.out_channels + m) * run.positions : nullptr;
  }
}

// ---------------------------------------------------------------- dense kernels

// Dense layout: for each vector (three at a time in the AVX2 kernel), every
// block of kConvBlockChannels output channels of the group in turn, so the
// vector's input stays in L1 while the (small) weights stream:
// out[r][position] = init[r] + sum over k of values[k][r] * input(k, position).
void DenseGeneric(const ConvRun& run, Source source, const OutputVector* vectors, uint64_t count) {
  constexpr unsigned kLanes = kConvBlockChannels;
  const ConvWeights& w = *run.w;
  for (uint64_t v = 0; v < count; ++v) {
    const float* base = source.data + vectors[v].input_offset;
    for (uint64_t block = 0; block < w.blocks_per_group; ++block) {
      float init[kLanes];
      float* out[kLanes];
      BlockLanes(run, block, init, out);
      const float* values = w.blocks.data() + (run.group * w.blocks_per_group + block) * w.patch_size * kLanes;
      float acc[kLanes][kVector];
      for (unsigned r = 0; r < kLanes; ++r)
        for (unsigned q = 0; q < kVector; ++q) acc[r][q] = init[r];
      for (uint64_t k = 0; k < w.patch_size; ++k) {
        const float* column = base + source.offsets[k];
        for (unsigned r = 0; r < kLanes; ++r) {
          const float weight = values[k * kLanes + r];
          for (unsigned q = 0; q < kVector; ++q) acc[r][q] += weight * column[q];
        }
      }
      for (unsigned r = 0; r < kLanes; ++r) {
        if (out[r] != nullptr)
          std::memcpy(out[r] + vectors[v].output_offset, acc[r], static_cast<size_t>(vectors[v].width) * sizeof(float));
      }
    }
  }
}

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

// kV vectors (1 to 3) against every block of 4 output channels: 4 x kV
// accumulators (12 of the 16 registers for three vectors, enough independent
// multiply-adds to cover their latency), the vectors' inputs loaded once per
// kernel element and each weight broadcast once.
template <int kV>
__attribute__((target("avx2,fma"))) inline void DenseAvx2Vectors(const ConvRun& run, Source source,
                                                                  const OutputVector* vectors) {
  static_assert(kConvBlockChannels == 4 && kVector == 8, "the AVX2 dense kernel holds 4 channels x kV vectors");
  const ConvWeights& w = *run.w;
  const uint64_t k_count = w.patch_size;
  const uint64_t* offsets = source.offsets;
  const float* base[kV];
  for (int i = 0; i < kV; ++i) base[i] = source.data + vectors[i].input_offset;
  for (uint64_t block = 0; block < w.blocks_per_group; ++block) {
    float init[4];
    float* out[4];
    BlockLanes(run, block, init, out);
    __m256 acc[4][kV];
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < kV; ++i) acc[r][i] = _mm256_set1_ps(init[r]);
    const float* weights = w.blocks.data() + (run.group * w.blocks_per_group + block) * k_count * 4;
    for (uint64_t k = 0; k < k_count; ++k, weights += 4) {
      __m256 column[kV];
      for (int i = 0; i < kV; ++i) column[i] = _mm256_loadu_ps(base[i] + offsets[k]);
      for (int r = 0; r < 4; ++r) {
        const __m256 weight = _mm256_broadcast_ss(weights + r);
        for (int i = 0; i < kV; ++i) acc[r][i] = _mm256_fmadd_ps(weight, column[i], acc[r][i]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      if (out[r] == nullptr) continue;
      for (int i = 0; i < kV; ++i) StoreVector(out[r], vectors[i], acc[r][i]);
    }
  }
}

__attribute__((target("avx2,fma"))) void DenseAvx2(const ConvRun& run, Source source, const OutputVector* vectors,
                                                   uint64_t count) {
  uint64_t v = 0;
  for (; v + 3 <= count; v += 3) DenseAvx2Vectors<3>(run, source, vectors + v);
  if (count - v == 2) DenseAvx2Vectors<2>(run, source, vectors + v);
  if (count - v == 1) DenseAvx2Vectors<1>(run, source, vectors + v);
}
#endif

// ---------------------------------------------------------------- index-layout kernels

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
  if (!run.w->blocks.empty()) {
#ifdef ONNX_DC_CONV_AVX2
    if (run.isa == KernelIsa::kAvx2) {
      DenseAvx2(run, source, vectors, count);
      return;
    }
#endif
    DenseGeneric(run, source, vectors, count);
    return;
  }
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
         entries.capacity() * sizeof(uint32_t) + blocks.capacity() * sizeof(float);
}

bool BuildConvWeights(const DecodedContainer& decoded, const ConvAttributes& attributes, ConvWeights* out,
                      std::string* error) {
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
  // Entries in flat (row-major [M, patch]) order are already channel by
  // channel, k ascending.
  uint64_t kept = 0;
  for (uint16_t code : decoded.codes) kept += (code != zero_symbol);
  const uint64_t per_group = w.out_channels / w.group;
  // Groups of fewer channels than a block (depthwise) would leave most of the
  // dense kernel's lanes idle: they keep the index layout.
  const bool dense = per_group >= kConvBlockChannels &&
                     static_cast<double>(kept) >= kConvDenseKeptFraction * static_cast<double>(info.numel);
  w.entries.clear();
  w.channel_offsets.clear();
  w.blocks.clear();
  if (dense) {
    w.blocks_per_group = (per_group + kConvBlockChannels - 1) / kConvBlockChannels;
    w.blocks.assign(static_cast<size_t>(w.group * w.blocks_per_group * w.patch_size * kConvBlockChannels), 0.0f);
  } else {
    w.entries.reserve(static_cast<size_t>(kept));
    w.channel_offsets.assign(static_cast<size_t>(w.out_channels + 1), 0);
  }
  const bool sparse = info.layout == Layout::kSparse;
  uint64_t position = 0;  // flat index of the current entry
  for (uint64_t e = 0; e < info.entries; ++e, ++position) {
    if (sparse) position += decoded.gaps[e];  // the decoder checked every position < numel
    const uint16_t code = decoded.codes[e];
    if (code == zero_symbol) continue;
    const uint64_t m = position / w.patch_size, k = position % w.patch_size;
    if (dense) {
      const uint64_t group = m / per_group, in_group = m % per_group;
      const uint64_t block = group * w.blocks_per_group + in_group / kConvBlockChannels;
      w.blocks[static_cast<size_t>((block * w.patch_size + k) * kConvBlockChannels + in_group % kConvBlockChannels)] =
          w.codebook[code];
    } else {
      w.channel_offsets[m + 1]++;
      w.entries.push_back(static_cast<uint32_t>((k << 8) | code));
    }
  }
  if (!dense) {
    for (uint64_t m = 0; m < w.out_channels; ++m) w.channel_offsets[m + 1] += w.channel_offsets[m];
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

std::string RunConv(const ConvWeights& w, const ConvGeometry& g, const float* x, const float* bias, float* y,
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
  // Dense: two vectors per kernel step, two steps per task; index layout: one
  // register set of vectors per task.
  run.vectors_per_task = w.blocks.empty() ? kMaxChannelVectors : 6;
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

}  // namespace onnx_dc
