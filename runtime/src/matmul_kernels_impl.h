// Kernel bodies shared by every instruction-set variant. Included once per
// variant inside `namespace onnx_dc::<variant>` (see matmul_kernels_*.cc); the
// compiler vectorizes the fixed-width tile loops for each target.
//
// NOLINT(build/header_guard): deliberately included more than once.

namespace detail {

inline float ApplyEpilogue(float acc, const TileTask& task, uint64_t column) {
  float value = task.alpha * acc;
  if (task.bias != nullptr) value += task.beta * task.bias[task.bias_size == 1 ? 0 : column];
  // Fused Relu; NaN stays NaN as in onnxruntime's Relu.
  if (task.relu && value < 0.0f) value = 0.0f;
  return value;
}

// One row run of batch row count 1: y[column] += xk * codebook[code] for its
// entries. The columns of one run are distinct, so its updates never alias:
// four independent read-modify-writes per iteration. Kept out of line: with
// few live values the compiler holds everything in registers.
__attribute__((noinline)) void RowRunUpdate(const uint16_t* p, const uint16_t* end, float xk,
                                            const float* __restrict codebook, float* __restrict y, uint64_t shift) {
  const uint64_t mask = (uint64_t{1} << shift) - 1;
  for (; end - p >= 4; p += 4) {
    const uint64_t e0 = p[0], e1 = p[1], e2 = p[2], e3 = p[3];
    y[e0 & mask] += xk * codebook[e0 >> shift];
    y[e1 & mask] += xk * codebook[e1 >> shift];
    y[e2 & mask] += xk * codebook[e2 >> shift];
    y[e3 & mask] += xk * codebook[e3 >> shift];
  }
  for (; p < end; ++p) {
    const uint64_t e = *p;
    y[e & mask] += xk * codebook[e >> shift];
  }
}

// Batch row count 1: accumulate straight into the output row.
inline void RunSingleRow(const BlockTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  float* y = task.y + first_column;
  for (uint64_t j = 0; j < width; ++j) y[j] = 0.0f;

  const uint32_t* offsets = w.row_offsets.data() + uint64_t{task.block} * (w.in_features + 1);
  const uint16_t* entries = w.entries.data();
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    RowRunUpdate(entries + offsets[k], entries + offsets[k + 1], task.x[k], w.codebook.data(), y, w.column_bits);
  }
  if (task.alpha != 1.0f || task.bias != nullptr || task.relu) {
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
// input row adds x[k] times a contiguous row of W' to the block's outputs,
// four rows per pass so the outputs are loaded and stored once per four rows.
inline void RunDenseSingleRow(const BlockTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  float* __restrict y = task.y + first_column;
  for (uint64_t j = 0; j < width; ++j) y[j] = 0.0f;
  const float* __restrict values = w.dense.data() + first_column;
  const float* __restrict x = task.x;
  const uint64_t stride = w.out_features;
  uint64_t a = 0;
  for (; a + 4 <= task.num_active_rows; a += 4) {
    const uint32_t k0 = task.active_rows[a], k1 = task.active_rows[a + 1];
    const uint32_t k2 = task.active_rows[a + 2], k3 = task.active_rows[a + 3];
    const float x0 = x[k0], x1 = x[k1], x2 = x[k2], x3 = x[k3];
    const float* __restrict r0 = values + uint64_t{k0} * stride;
    const float* __restrict r1 = values + uint64_t{k1} * stride;
    const float* __restrict r2 = values + uint64_t{k2} * stride;
    const float* __restrict r3 = values + uint64_t{k3} * stride;
    for (uint64_t j = 0; j < width; ++j) y[j] += (x0 * r0[j] + x1 * r1[j]) + (x2 * r2[j] + x3 * r3[j]);
  }
  for (; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    const float xk = x[k];
    const float* __restrict row = values + uint64_t{k} * stride;
    for (uint64_t j = 0; j < width; ++j) y[j] += xk * row[j];
  }
  if (task.alpha != 1.0f || task.bias != nullptr || task.relu) {
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

// Column runs, batch 1: each output accumulates its run of every row block in
// registers (four independent partial sums), gathering x through the entries.
// One column run: sum of x[row] * codebook[code] over its entries, in eight
// independent partial sums (more than the multiply-add latency covers at one
// weight per cycle). Kept out of line: with few live values the compiler holds
// everything in registers.
__attribute__((noinline)) float ColumnRunDot(const uint16_t* p, const uint16_t* end, const float* __restrict x,
                                             const float* __restrict codebook, uint64_t shift) {
  const uint64_t mask = (uint64_t{1} << shift) - 1;
  float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (; end - p >= 8; p += 8) {
    for (int u = 0; u < 8; ++u) {
      const uint64_t e = p[u];
      a[u] += x[e & mask] * codebook[e >> shift];
    }
  }
  // The tail in a[0] (indexing a with a variable would keep a in memory).
  for (; p < end; ++p) {
    const uint64_t e = *p;
    a[0] += x[e & mask] * codebook[e >> shift];
  }
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// Column runs, batch row count 1: each output accumulates its run of every
// row block in registers, gathering x through the entries.
inline void RunColumns(const ColumnTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t n_count = w.out_features;
  float* __restrict y = task.y;
  const uint16_t* entries = w.entries.data();
  const float* codebook = w.codebook.data();
  const uint64_t shift = w.column_bits;
  for (uint64_t n = task.first_column; n < task.end_column; ++n) y[n] = 0.0f;
  for (uint32_t r = 0; r < w.num_row_blocks; ++r) {
    const float* x = task.x + uint64_t{r} * w.block_rows;
    const uint32_t* offsets = w.column_offsets.data() + uint64_t{r} * (n_count + 1);
    for (uint64_t n = task.first_column; n < task.end_column; ++n)
      y[n] += ColumnRunDot(entries + offsets[n], entries + offsets[n + 1], x, codebook, shift);
  }
  if (task.alpha != 1.0f || task.bias != nullptr || task.relu) {
    for (uint64_t n = task.first_column; n < task.end_column; ++n) y[n] = ApplyEpilogue(y[n], task, n);
  }
}

// One column run for a tile of kWidth batch rows: x holds the tile transposed
// (x[row * kWidth + t]), so each weight drives one vector multiply-add; eight
// partial sums keep enough loads in flight to hide the cache latency of the
// scattered rows of x.
template <unsigned kWidth>
__attribute__((noinline)) void ColumnRunTileDot(const uint16_t* p, const uint16_t* end, const float* __restrict x,
                                                const float* __restrict codebook, uint64_t shift, float* out) {
  typedef float Vec __attribute__((vector_size(kWidth * sizeof(float))));
  const uint64_t mask = (uint64_t{1} << shift) - 1;
  Vec a[8] = {Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}};
  for (; end - p >= 8; p += 8) {
    for (int u = 0; u < 8; ++u) {
      const uint64_t e = p[u];
      Vec xv;
      std::memcpy(&xv, x + (e & mask) * kWidth, sizeof(Vec));
      a[u] += codebook[e >> shift] * xv;
    }
  }
  // The tail in a[0] (indexing a with a variable would keep a in memory).
  for (; p < end; ++p) {
    const uint64_t e = *p;
    Vec xv;
    std::memcpy(&xv, x + (e & mask) * kWidth, sizeof(Vec));
    a[0] += codebook[e >> shift] * xv;
  }
  Vec sum;
  std::memcpy(&sum, out, sizeof(Vec));
  sum += ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  std::memcpy(out, &sum, sizeof(Vec));
}

template <unsigned kWidth>
void RunColumnTile(const ColumnTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t n_count = w.out_features;
  const uint16_t* entries = w.entries.data();
  const float* codebook = w.codebook.data();
  const uint64_t shift = w.column_bits;
  for (uint64_t n = task.first_column; n < task.end_column; ++n) {
    float acc[kWidth] = {};
    for (uint32_t r = 0; r < w.num_row_blocks; ++r) {
      const float* x = task.x + uint64_t{r} * w.block_rows * kWidth;
      const uint32_t* offsets = w.column_offsets.data() + uint64_t{r} * (n_count + 1);
      ColumnRunTileDot<kWidth>(entries + offsets[n], entries + offsets[n + 1], x, codebook, shift, acc);
    }
    for (unsigned t = 0; t < task.tile_rows; ++t) task.y[t * task.y_stride + n] = ApplyEpilogue(acc[t], task, n);
  }
}

}  // namespace detail

void RunColumnTask(const ColumnTask& task) {
  switch (task.tile_width) {
    case 1:
      detail::RunColumns(task);
      break;
    case 4:
      detail::RunColumnTile<4>(task);
      break;
    case 8:
      detail::RunColumnTile<8>(task);
      break;
    default:
      detail::RunColumnTile<16>(task);
      break;
  }
}

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
