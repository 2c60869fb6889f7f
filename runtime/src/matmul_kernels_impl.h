// Kernel bodies shared by every instruction-set variant. Included once per
// variant inside `namespace onnx_dc::<variant>` (see matmul_kernels_*.cc); the
// compiler vectorizes the fixed-width tile loops for each target.
//
// NOLINT(build/header_guard): deliberately included more than once.

namespace detail {

inline float ApplyEpilogue(float acc, const BlockTask& task, uint64_t column) {
  float value = task.alpha * acc;
  if (task.bias != nullptr) value += task.beta * task.bias[task.bias_size == 1 ? 0 : column];
  return value;
}

// Batch row count 1: accumulate straight into the output row.
inline void RunSingleRow(const BlockTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  float* __restrict y = task.y + first_column;
  for (uint64_t j = 0; j < width; ++j) y[j] = 0.0f;

  const uint32_t* __restrict offsets = w.row_offsets.data() + uint64_t{task.block} * (w.in_features + 1);
  const uint16_t* __restrict entries = w.entries.data();
  const float* __restrict codebook = w.codebook.data();
  const float* __restrict x = task.x;
  const unsigned shift = w.column_bits;
  const uint32_t mask = (uint32_t{1} << shift) - 1;
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    const float xk = x[k];
    const uint32_t end = offsets[k + 1];
    // The columns of one run are distinct, so its updates never alias: four
    // independent read-modify-writes per iteration.
    uint32_t i = offsets[k];
    for (; i + 4 <= end; i += 4) {
      const uint32_t e0 = entries[i], e1 = entries[i + 1], e2 = entries[i + 2], e3 = entries[i + 3];
      y[e0 & mask] += xk * codebook[e0 >> shift];
      y[e1 & mask] += xk * codebook[e1 >> shift];
      y[e2 & mask] += xk * codebook[e2 >> shift];
      y[e3 & mask] += xk * codebook[e3 >> shift];
    }
    for (; i < end; ++i) {
      const uint32_t e = entries[i];
      y[e & mask] += xk * codebook[e >> shift];
    }
  }
  if (task.alpha != 1.0f || task.bias != nullptr) {
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(y[j], task, first_column + j);
  }
}

// A tile of kWidth batch rows: accumulate acc[column] += w * x[k] where
// acc[column] and x[k] hold the tile's kWidth rows side by side, so each
// weight drives one vector multiply-add.
template <unsigned kWidth>
void RunTile(const BlockTask& task) {
  typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  Vec acc[kMaxTileFloats / kWidth];  // width * kWidth <= kMaxTileFloats (the driver's tile choice)
  for (uint64_t j = 0; j < width; ++j) acc[j] = Vec{};

  const uint32_t* __restrict offsets = w.row_offsets.data() + uint64_t{task.block} * (w.in_features + 1);
  const uint16_t* __restrict entries = w.entries.data();
  const float* __restrict codebook = w.codebook.data();
  const unsigned shift = w.column_bits;
  const uint32_t mask = (uint32_t{1} << shift) - 1;
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    Vec xv;
    std::memcpy(&xv, task.x + uint64_t{k} * kWidth, sizeof(Vec));
    const uint32_t end = offsets[k + 1];
    for (uint32_t i = offsets[k]; i < end; ++i) {
      const uint32_t e = entries[i];
      acc[e & mask] += codebook[e >> shift] * xv;
    }
  }
  for (unsigned t = 0; t < task.tile_rows; ++t) {
    float* __restrict y = task.y + t * task.y_stride + first_column;
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(acc[j][t], task, first_column + j);
  }
}

// The dense layout (lightly pruned weights), batch row count 1: each active
// input row adds x[k] times a contiguous row of W' to the block's outputs.
inline void RunDenseSingleRow(const BlockTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  float* __restrict y = task.y + first_column;
  for (uint64_t j = 0; j < width; ++j) y[j] = 0.0f;
  const float* __restrict values = w.dense.data() + first_column;
  const float* __restrict x = task.x;
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    const float xk = x[k];
    const float* __restrict row = values + uint64_t{k} * w.out_features;
    for (uint64_t j = 0; j < width; ++j) y[j] += xk * row[j];
  }
  if (task.alpha != 1.0f || task.bias != nullptr) {
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(y[j], task, first_column + j);
  }
}

// The dense layout, a tile of kWidth batch rows (x transposed as in RunTile).
template <unsigned kWidth>
void RunDenseTile(const BlockTask& task) {
  typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  Vec acc[kMaxTileFloats / kWidth];
  for (uint64_t j = 0; j < width; ++j) acc[j] = Vec{};
  const float* __restrict values = w.dense.data() + first_column;
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    Vec xv;
    std::memcpy(&xv, task.x + uint64_t{k} * kWidth, sizeof(Vec));
    const float* __restrict row = values + uint64_t{k} * w.out_features;
    for (uint64_t j = 0; j < width; ++j) acc[j] += row[j] * xv;
  }
  for (unsigned t = 0; t < task.tile_rows; ++t) {
    float* __restrict y = task.y + t * task.y_stride + first_column;
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(acc[j][t], task, first_column + j);
  }
}

}  // namespace detail

void RunBlockTask(const BlockTask& task) {
  if (!task.weights->dense.empty()) {
    switch (task.tile_width) {
      case 1:
        detail::RunDenseSingleRow(task);
        break;
      case 4:
        detail::RunDenseTile<4>(task);
        break;
      case 8:
        detail::RunDenseTile<8>(task);
        break;
      default:
        detail::RunDenseTile<16>(task);
        break;
    }
    return;
  }
  switch (task.tile_width) {
    case 1:
      detail::RunSingleRow(task);
      break;
    case 4:
      detail::RunTile<4>(task);
      break;
    case 8:
      detail::RunTile<8>(task);
      break;
    default:
      detail::RunTile<16>(task);
      break;
  }
}
