// Fused activations, shared by the panel GEMM (gemm_kernels_impl.h) and the
// convolution kernels (conv_kernels_impl.h). Included inside the namespace of
// each instruction-set variant (onnx_dc::generic / avx2 / avx512), so the plain
// loops below are vectorised for that file's instruction set.
//
// NOLINT(build/header_guard): deliberately included once per variant namespace.

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

// 1 / (1 + exp(-x)); exp clamped as in ExpApprox, so the result is within
// 2e-7 of float64 everywhere (0 and 1 at the ends are approached, not reached
// below |x| = 87).
inline float Sigmoid(float x) { return 1.0f / (1.0f + ExpApprox(-x)); }

// tanh(x): Cephes' odd polynomial below |x| = 0.625 (no cancellation near 0),
// 1 - 2 / (1 + exp(2|x|)) with the sign of x above.
inline float Tanh(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.0f - 2.0f / (1.0f + ExpApprox(2.0f * a));
  const float signed_large = x < 0.0f ? -large : large;
  return a < 0.625f ? small : signed_large;
}

#if defined(__AVX512F__)
// AVX-512 sigmoid and SiLU, 16 lanes at a time. exp(x) = 2^n * 2^f with n =
// round(x log2 e) and f = x log2 e - n in [-0.5, 0.5] (the product taken in
// two FMAs, log2 e split in a float and its remainder), 2^f by a degree-6
// polynomial (coefficients fitted here to 2^f on [-0.5, 0.5] by iteratively
// reweighted least squares on the relative error: 1.9e-9 in float64, 1e-7
// in float32 Horner steps) and the scaling by vscalefps, which needs no
// exponent-bit arithmetic: 13 vector operations where the scalar ExpApprox
// compiles to 18. 1 / (1 + e) is the 14-bit reciprocal estimate refined by
// one Newton step (about 1 ulp) instead of a division, whose throughput
// (about 10 cycles per vector) bounded the loop. The argument is clamped to
// [-87, 88] as in ExpApprox (1 + e stays finite); NaN stays NaN (max / min
// return their second operand on NaN); the reciprocal of 1 + exp(88) is a
// subnormal, which vrcp14ps returns as such without FTZ, so x * it keeps -inf.
inline __m512 ExpApprox16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
  const __m512 log2e = _mm512_set1_ps(1.44269502162933349609375f);          // float(log2 e)
  const __m512 log2e_rest = _mm512_set1_ps(1.92596298909109e-8f);  // log2 e - it
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(x, log2e, n);
  f = _mm512_fmadd_ps(x, log2e_rest, f);
  __m512 p = _mm512_set1_ps(1.534574112156406e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399904128164053e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489071726799e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550329014658928e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471824645996e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + exp(-x)), then times x for SiLU.
template <bool kSilu>
inline __m512 Sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, ExpApprox16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
  return kSilu ? _mm512_mul_ps(x, r) : r;
}

template <bool kSilu>
inline void SigmoidAvx512(float* y, uint64_t count) {
  uint64_t j = 0;
  for (; j + 16 <= count; j += 16) _mm512_storeu_ps(y + j, Sigmoid16<kSilu>(_mm512_loadu_ps(y + j)));
  if (j < count) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (count - j)) - 1u);
    _mm512_mask_storeu_ps(y + j, mask, Sigmoid16<kSilu>(_mm512_maskz_loadu_ps(mask, y + j)));
  }
}
#endif

// y[j] = act(y[j]) for j < count: one plain loop per activation, which the
// compiler vectorises for the file's instruction set.
inline void Activate(float* __restrict y, uint64_t count, const ActivationSpec& act) {
  const float p0 = act.p0, p1 = act.p1;
  switch (act.kind) {
    case Activation::kNone:
      break;
    case Activation::kRelu:
      for (uint64_t j = 0; j < count; ++j) y[j] = y[j] < 0.0f ? 0.0f : y[j];  // NaN stays NaN
      break;
    case Activation::kGelu:
      for (uint64_t j = 0; j < count; ++j) y[j] = Gelu(y[j]);
      break;
    case Activation::kGeluTanh:
      for (uint64_t j = 0; j < count; ++j) y[j] = GeluTanh(y[j]);
      break;
    case Activation::kClip:
      for (uint64_t j = 0; j < count; ++j) {
        const float v = y[j] < p0 ? p0 : y[j];  // NaN stays NaN (both comparisons false)
        y[j] = v > p1 ? p1 : v;
      }
      break;
    case Activation::kHardSigmoid:
      for (uint64_t j = 0; j < count; ++j) {
        const float v = p0 * y[j] + p1;
        const float lo = v < 0.0f ? 0.0f : v;
        y[j] = lo > 1.0f ? 1.0f : lo;
      }
      break;
    case Activation::kHardSwish:
      for (uint64_t j = 0; j < count; ++j) {
        const float v = y[j] * (1.0f / 6.0f) + 0.5f;
        const float lo = v < 0.0f ? 0.0f : v;
        y[j] = y[j] * (lo > 1.0f ? 1.0f : lo);
      }
      break;
    case Activation::kSigmoid:
#if defined(__AVX512F__)
      SigmoidAvx512<false>(y, count);
#else
      for (uint64_t j = 0; j < count; ++j) y[j] = Sigmoid(y[j]);
#endif
      break;
    case Activation::kSilu:
#if defined(__AVX512F__)
      SigmoidAvx512<true>(y, count);
#else
      for (uint64_t j = 0; j < count; ++j) y[j] = y[j] * Sigmoid(y[j]);
#endif
      break;
    case Activation::kLeakyRelu:
      for (uint64_t j = 0; j < count; ++j) y[j] = y[j] < 0.0f ? p0 * y[j] : y[j];
      break;
    case Activation::kTanh:
      for (uint64_t j = 0; j < count; ++j) y[j] = Tanh(y[j]);
      break;
  }
}

// Activate(y + r * stride, width, act) for r < rows, the kind dispatched once
// (the convolution kernels' panels and channel-lane tiles activate many short
// rows: 48 positions, 64 channels).
inline void ActivateRows(float* y, uint64_t stride, uint64_t rows, uint64_t width, const ActivationSpec& act) {
  if (act.kind == Activation::kNone || width == 0) return;
#if defined(__AVX512F__)
  if (act.kind == Activation::kSilu) {
    for (uint64_t r = 0; r < rows; ++r) SigmoidAvx512<true>(y + r * stride, width);
    return;
  }
#endif
  for (uint64_t r = 0; r < rows; ++r) Activate(y + r * stride, width, act);
}

}  // namespace gemm_detail
