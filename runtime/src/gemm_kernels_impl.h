// The panel GEMM task body and its epilogue, shared by every instruction-set
// variant (gemm_kernels_{generic,avx2,avx512}.cc). Included once per variant
// inside `namespace onnx_dc::<variant>`, after the variant has defined
//
//   constexpr unsigned kTileRows;   // rows of a register tile (the packing of X)
//   void DecodeBlock(const uint8_t* codes, unsigned kc, const float* codebook, uint32_t limit, float* b);
//       // b[i] = codebook[codes[i]] for i < kc * kPanelColumns (limit: 1 + the largest code)
//   void MultiplyTile(const float* a, const float* b, unsigned kc, unsigned rows, float* y, uint64_t ldy,
//                     unsigned columns, bool accumulate);
//       // y[r][j] (+)= sum_k a[k * kTileRows + r] * b[k * 32 + j], r < rows, j < columns
//
// NOLINT(build/header_guard): deliberately included more than once.

namespace gemm_detail {

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// exp(x) for x in [-87, 88] (clamped; NaN stays NaN), about 1 ulp: Cephes'
// polynomial on x - n ln 2, scaled by 2^n through the exponent bits. Plain
// arithmetic, so the epilogue loops vectorise; no float-to-int conversion
// (n is read from the bits of x * log2(e) + 1.5 * 2^23).
inline float ExpApprox(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // round(x log2 e) in the low mantissa bits
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  const uint32_t biased = FloatToBits(shifted) - 0x4B400000u + 127u;  // n + 127, in 1..254 after the clamp
  return e * BitsToFloat((biased & 0xFFu) << 23);
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
inline float ErfApprox(float x) {
  const float a = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * ExpApprox(-a * a);
  return x < 0.0f ? -y : y;
}

inline float Gelu(float x) { return 0.5f * x * (1.0f + ErfApprox(x * 0.70710678118654752f)); }

// 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
inline float GeluTanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + ExpApprox(-2.0f * u));
}

// y[j] = act(alpha * y[j] + beta * bias[first_column + j]) for j < columns.
inline void ApplyEpilogue(float* __restrict y, uint64_t first_column, unsigned columns, const GemmArgs& args) {
  const float alpha = args.alpha, beta = args.beta;
  if (alpha != 1.0f) {
    for (unsigned j = 0; j < columns; ++j) y[j] *= alpha;
  }
  if (args.bias != nullptr) {
    if (args.bias_size == 1) {
      const float b = beta * args.bias[0];
      for (unsigned j = 0; j < columns; ++j) y[j] += b;
    } else {
      const float* __restrict bias = args.bias + first_column;
      for (unsigned j = 0; j < columns; ++j) y[j] += beta * bias[j];
    }
  }
  switch (args.activation) {
    case Activation::kNone:
      break;
    case Activation::kRelu:
      for (unsigned j = 0; j < columns; ++j) y[j] = y[j] < 0.0f ? 0.0f : y[j];  // NaN stays NaN
      break;
    case Activation::kGelu:
      for (unsigned j = 0; j < columns; ++j) y[j] = Gelu(y[j]);
      break;
    case Activation::kGeluTanh:
      for (unsigned j = 0; j < columns; ++j) y[j] = GeluTanh(y[j]);
      break;
  }
}

inline bool NeedsEpilogue(const GemmArgs& args) {
  return args.alpha != 1.0f || args.bias != nullptr || args.activation != Activation::kNone;
}

}  // namespace gemm_detail

void ApplyActivationTo(float* y, uint64_t count, Activation activation) {
  GemmArgs args;
  args.activation = activation;
  for (uint64_t i = 0; i < count; i += 4096) {
    gemm_detail::ApplyEpilogue(y + i, 0, static_cast<unsigned>(std::min<uint64_t>(4096, count - i)), args);
  }
}

namespace gemm_detail {

// The task body; decode(codes, kc, weights, block) fills block[kc][32].
template <typename Decode>
__attribute__((always_inline)) inline void RunPanelTaskWith(const PanelTask& task, Decode decode) {
#ifdef ONNX_DC_GEMM_FEW_ROWS
  if (task.end_row - task.first_row <= kFewRows && task.weights->in_features > 0) {
    RunFewRows(task);
    return;
  }
#endif
  const PanelWeights& w = *task.weights;
  const GemmArgs& args = *task.args;
  const uint64_t k_count = w.in_features, n_count = w.out_features;
  const uint64_t first_column = task.panel * kPanelColumns;
  const unsigned columns = static_cast<unsigned>(std::min<uint64_t>(kPanelColumns, n_count - first_column));
  const bool epilogue = NeedsEpilogue(args);
  float* y_panel = args.y + first_column;
  if (k_count == 0) {
    for (uint64_t m = task.first_row; m < task.end_row; ++m) {
      float* y = y_panel + m * n_count;
      for (unsigned j = 0; j < columns; ++j) y[j] = 0.0f;
      if (epilogue) ApplyEpilogue(y, first_column, columns, args);
    }
    return;
  }
  alignas(64) float block[kPanelDepth * kPanelColumns];
  const uint64_t k_rows = w.plane_order ? (k_count + 1) / 2 * 2 : k_count;
  const uint8_t* codes = w.codes.data() + task.panel * k_rows * kPanelColumns;
  for (uint64_t k0 = 0; k0 < k_count; k0 += kPanelDepth) {
    const unsigned kc = static_cast<unsigned>(std::min<uint64_t>(kPanelDepth, k_count - k0));
    decode(codes + k0 * kPanelColumns, kc, w, block);
    const bool last = k0 + kc == k_count;
    for (uint64_t m = task.first_row; m < task.end_row; m += kTileRows) {
      const unsigned rows = static_cast<unsigned>(std::min<uint64_t>(kTileRows, task.end_row - m));
      const float* a = task.packed_x + ((m / kTileRows) * k_count + k0) * kTileRows;
      float* y = y_panel + m * n_count;
      MultiplyTile(a, block, kc, rows, y, n_count, columns, k0 > 0);
      if (last && epilogue) {
        for (unsigned r = 0; r < rows; ++r) ApplyEpilogue(y + r * n_count, first_column, columns, args);
      }
    }
  }
}

}  // namespace gemm_detail

void RunPanelTask(const PanelTask& task) {
  gemm_detail::RunPanelTaskWith(task, [](const uint8_t* codes, unsigned kc, const PanelWeights& w, float* block) {
    DecodeBlock(codes, kc, w.codebook.data(), w.code_limit, block);
  });
}
