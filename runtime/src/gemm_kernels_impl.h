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

#include "activation_impl.h"

namespace gemm_detail {

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
  Activate(y, columns, args.activation);
}

inline bool NeedsEpilogue(const GemmArgs& args) {
  return args.alpha != 1.0f || args.bias != nullptr || args.activation.kind != Activation::kNone;
}

}  // namespace gemm_detail

void ApplyActivationTo(float* y, uint64_t count, const ActivationSpec& activation) {
  gemm_detail::Activate(y, count, activation);
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
