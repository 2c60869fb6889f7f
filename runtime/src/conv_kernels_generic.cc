// DCConv kernels for the baseline x86-64 instruction set: plain C++ on
// groups of 4 floats (the compiler vectorises them with SSE2); 4 output
// channels x 8 positions per register tile.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "conv_kernels.h"

#define ONNX_DC_CONV_MAX_ROWS 4

namespace onnx_dc {
namespace generic {

namespace {

struct V {
  struct T {
    float v[4];
  };
  static constexpr unsigned kLanes = 4;
  static T Zero() { return T{{0.0f, 0.0f, 0.0f, 0.0f}}; }
  static T Load(const float* p) {
    T t;
    std::memcpy(t.v, p, sizeof(t.v));
    return t;
  }
  static void Store(float* p, T t) { std::memcpy(p, t.v, sizeof(t.v)); }
  static T Set1(float f) { return T{{f, f, f, f}}; }
  static T Fma(T a, T b, T c) {
    for (unsigned i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static void StoreZeros(float* p, unsigned bits) {
    for (unsigned i = 0; i < kLanes; ++i) {
      if ((bits >> i) & 1u) p[i] = 0.0f;
    }
  }
  static T Add(T a, T b) {
    for (unsigned i = 0; i < 4; ++i) a.v[i] += b.v[i];
    return a;
  }
  static void CopyN(float* dst, const float* src, unsigned n) {
    for (unsigned i = 0; i < n; ++i) dst[i] = src[i];
  }
};
constexpr unsigned kTileVectors = 2;
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
  for (uint64_t i = 0; i < pairs; ++i) {
    even[i] = src[2 * i];
    odd[i] = src[2 * i + 1];
  }
}

#include "conv_kernels_impl.h"

// Channels-in-lanes tile: 2 vectors of channels x 4 positions.
constexpr unsigned kLaneVectors = 2;
constexpr unsigned kLanePositions = 4;
#define ONNX_DC_CONV_LANE_VECTORS 2
#define ONNX_DC_CONV_LANE_POSITIONS 4
#include "conv_lanes_impl.h"

}  // namespace generic
}  // namespace onnx_dc
