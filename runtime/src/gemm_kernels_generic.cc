// Panel GEMM kernels for the baseline x86-64 instruction set (plain C++; the
// compiler vectorises the 32-column loops with SSE2).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm.h"

namespace onnx_dc {
namespace generic {

namespace {

constexpr unsigned kTileRows = 4;

void DecodeBlock(const uint8_t* codes, unsigned kc, const float* codebook, uint32_t, float* b) {
  const unsigned count = kc * kPanelColumns;
  for (unsigned i = 0; i < count; ++i) b[i] = codebook[codes[i]];
}

void MultiplyTile(const float* a, const float* b, unsigned kc, unsigned rows, float* y, uint64_t ldy,
                  unsigned columns, bool accumulate) {
  float acc[kTileRows][kPanelColumns];
  for (unsigned r = 0; r < kTileRows; ++r) {
    for (unsigned j = 0; j < kPanelColumns; ++j) acc[r][j] = 0.0f;
  }
  if (accumulate) {
    for (unsigned r = 0; r < rows; ++r) std::memcpy(acc[r], y + r * ldy, columns * sizeof(float));
  }
  for (unsigned k = 0; k < kc; ++k) {
    const float* __restrict bk = b + k * kPanelColumns;
    for (unsigned r = 0; r < kTileRows; ++r) {
      const float av = a[k * kTileRows + r];
      for (unsigned j = 0; j < kPanelColumns; ++j) acc[r][j] += av * bk[j];
    }
  }
  for (unsigned r = 0; r < rows; ++r) std::memcpy(y + r * ldy, acc[r], columns * sizeof(float));
}

}  // namespace

#include "gemm_kernels_impl.h"

}  // namespace generic
}  // namespace onnx_dc
