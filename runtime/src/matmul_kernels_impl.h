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

// The float lanes of a tile of kWidth batch rows (a plain float for 1).
template <unsigned kWidth>
struct Lanes {
  typedef float Type __attribute__((vector_size(kWidth * sizeof(float))));
};
template <>
struct Lanes<1> {
  typedef float Type;
};

// Row k's lanes in x (x[k * kWidth + t]: the tile transposed, or the row itself for width 1).
template <unsigned kWidth>
__attribute__((always_inline)) inline typename Lanes<kWidth>::Type LoadLanes(const float* x, uint64_t k) {
  typename Lanes<kWidth>::Type v;
  std::memcpy(&v, x + k * kWidth, sizeof(v));
  return v;
}

// One run of the layout: its groups (kGroupSize positions, one codebook
// index each), then its singles (a position and an index each).
struct Run {
  const uint16_t* positions;
  const uint16_t* end;
  const uint8_t* group_codes;
  uint32_t groups;
  const uint8_t* single_codes;
};

inline Run RunAt(const SparseWeights& w, uint64_t index) {
  const uint32_t first = w.run_offsets[index], first_group = w.group_offsets[index];
  return Run{w.positions.data() + first, w.positions.data() + w.run_offsets[index + 1],
             w.group_codes.data() + first_group, w.group_offsets[index + 1] - first_group,
             w.single_codes.data() + (first - kGroupSize * first_group)};
}

// One row run: acc[position] += xk * codebook[code] for its weights. A group
// multiplies once and adds the product to its kGroupSize outputs. The
// positions of one run are distinct, so its updates never alias. Kept out of
// line: with few live values the compiler holds everything in registers.
// `x_lanes` points at row k's lanes of x (vectors go by pointer: passing them
// by value to an out-of-line function depends on the instruction set's ABI).
template <unsigned kWidth>
__attribute__((noinline)) void RowRunUpdate(const Run& run, const float* x_lanes, const float* __restrict codebook,
                                            typename Lanes<kWidth>::Type* __restrict acc) {
  typedef typename Lanes<kWidth>::Type Vec;
  const Vec xk = LoadLanes<kWidth>(x_lanes, 0);
  const uint16_t* p = run.positions;
  for (uint32_t g = 0; g < run.groups; ++g, p += kGroupSize) {
    const Vec v = codebook[run.group_codes[g]] * xk;
    for (unsigned j = 0; j < kGroupSize; ++j) acc[p[j]] += v;
  }
  const uint8_t* codes = run.single_codes;
  for (; run.end - p >= 4; p += 4, codes += 4) {
    acc[p[0]] += codebook[codes[0]] * xk;
    acc[p[1]] += codebook[codes[1]] * xk;
    acc[p[2]] += codebook[codes[2]] * xk;
    acc[p[3]] += codebook[codes[3]] * xk;
  }
  for (; p < run.end; ++p, ++codes) acc[*p] += codebook[*codes] * xk;
}

// Batch row count 1: accumulate straight into the output row.
inline void RunSingleRow(const BlockTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  float* y = task.y + first_column;
  for (uint64_t j = 0; j < width; ++j) y[j] = 0.0f;

  const uint64_t first_run = uint64_t{task.block} * (w.in_features + 1);
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    RowRunUpdate<1>(RunAt(w, first_run + k), task.x + k, w.codebook.data(), y);
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
  typedef typename Lanes<kWidth>::Type Vec;
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  Vec acc[kMaxTileFloats / kWidth];  // width * kWidth <= kMaxTileFloats (the driver's tile choice)
  for (uint64_t j = 0; j < width; ++j) acc[j] = Vec{};

  const uint64_t first_run = uint64_t{task.block} * (w.in_features + 1);
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    RowRunUpdate<kWidth>(RunAt(w, first_run + k), task.x + uint64_t{k} * kWidth, w.codebook.data(), acc);
  }
  for (unsigned t = 0; t < task.tile_rows; ++t) {
    float* __restrict y = task.y + t * task.y_stride + first_column;
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(acc[j][t], task, first_column + j);
  }
}

// The dense layout (lightly pruned weights), batch row count 1: per panel of
// 32 columns, the active input rows' panel rows (contiguous, one after the
// other in memory) are multiplied by x[k] into 4 x 2 vector accumulators (two
// rows at a time, so eight independent multiply-adds cover their latency);
// the outputs are written once per panel.
inline void RunDenseSingleRow(const BlockTask& task) {
  typedef float Vec __attribute__((vector_size(8 * sizeof(float))));
  constexpr unsigned kPrefetchRows = 32;
  static_assert(kDensePanelColumns == 32, "a panel row is four 8-float vectors");
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  const float* __restrict x = task.x;
  const uint32_t* active = task.active_rows;
  const uint64_t active_count = task.num_active_rows;
  for (uint64_t column = 0; column < width; column += kDensePanelColumns) {
    const float* __restrict panel =
        w.dense.data() + (first_column + column) / kDensePanelColumns * w.in_features * kDensePanelColumns;
    Vec a0[4] = {Vec{}, Vec{}, Vec{}, Vec{}}, a1[4] = {Vec{}, Vec{}, Vec{}, Vec{}};
    uint64_t a = 0;
    for (; a + 2 <= active_count; a += 2) {
      if (a + kPrefetchRows + 2 <= active_count) {
        // Panel rows kPrefetchRows ahead: lightly pruned weights seldom fit
        // L2, and the hardware prefetcher alone leaves the loop waiting on L3
        // (LeNet-300-100's fc1, 0.9 MB: 3-7 % faster end to end).
        for (unsigned r = kPrefetchRows; r < kPrefetchRows + 2; ++r) {
          const float* ahead = panel + uint64_t{active[a + r]} * kDensePanelColumns;
          __builtin_prefetch(ahead);
          __builtin_prefetch(ahead + 16);
        }
      }
      const uint32_t k0 = active[a], k1 = active[a + 1];
      const float x0 = x[k0], x1 = x[k1];
      const float* r0 = panel + uint64_t{k0} * kDensePanelColumns;
      const float* r1 = panel + uint64_t{k1} * kDensePanelColumns;
      for (unsigned q = 0; q < 4; ++q) {
        Vec v0, v1;
        std::memcpy(&v0, r0 + 8 * q, sizeof(Vec));
        std::memcpy(&v1, r1 + 8 * q, sizeof(Vec));
        a0[q] += x0 * v0;
        a1[q] += x1 * v1;
      }
    }
    if (a < active_count) {
      const uint32_t k = active[a];
      const float* r = panel + uint64_t{k} * kDensePanelColumns;
      for (unsigned q = 0; q < 4; ++q) {
        Vec v;
        std::memcpy(&v, r + 8 * q, sizeof(Vec));
        a0[q] += x[k] * v;
      }
    }
    float sums[kDensePanelColumns];
    for (unsigned q = 0; q < 4; ++q) {
      const Vec sum = a0[q] + a1[q];
      std::memcpy(sums + 8 * q, &sum, sizeof(Vec));
    }
    const uint64_t columns = std::min<uint64_t>(kDensePanelColumns, width - column);
    float* y = task.y + first_column + column;
    for (uint64_t j = 0; j < columns; ++j) y[j] = ApplyEpilogue(sums[j], task, first_column + column + j);
  }
}

// The dense layout, a tile of kWidth batch rows (x transposed as in RunTile):
// each weight drives one vector multiply-add over the tile.
template <unsigned kWidth>
void RunDenseTile(const BlockTask& task) {
  typedef typename Lanes<kWidth>::Type Vec;
  const SparseWeights& w = *task.weights;
  const uint64_t first_column = uint64_t{task.block} * w.block_columns;
  const uint64_t width = std::min<uint64_t>(w.block_columns, w.out_features - first_column);
  Vec acc[kMaxTileFloats / kWidth];
  for (uint64_t j = 0; j < width; ++j) acc[j] = Vec{};
  const float* __restrict panels = w.dense.data() + first_column / kDensePanelColumns * w.in_features * kDensePanelColumns;
  const uint64_t panel_floats = w.in_features * kDensePanelColumns;
  for (uint64_t a = 0; a < task.num_active_rows; ++a) {
    const uint32_t k = task.active_rows[a];
    const Vec xv = LoadLanes<kWidth>(task.x, k);
    for (uint64_t column = 0; column < width; column += kDensePanelColumns) {
      const float* __restrict row = panels + column / kDensePanelColumns * panel_floats + uint64_t{k} * kDensePanelColumns;
      const uint64_t columns = std::min<uint64_t>(kDensePanelColumns, width - column);
      for (uint64_t j = 0; j < columns; ++j) acc[column + j] += row[j] * xv;
    }
  }
  for (unsigned t = 0; t < task.tile_rows; ++t) {
    float* __restrict y = task.y + t * task.y_stride + first_column;
    for (uint64_t j = 0; j < width; ++j) y[j] = ApplyEpilogue(acc[j][t], task, first_column + j);
  }
}

// *sum = the sum of x over one group's positions. On little-endian machines
// the positions are read in pairs as 32-bit words and split with a shift:
// loads (one per position and one per x value, before) bound this loop, and
// a pair costs one load and two ALU operations, which balances the two
// (measured faster than both one load per position and one per four).
template <unsigned kWidth>
__attribute__((always_inline)) inline void GroupSum(const uint16_t* p, const float* __restrict x,
                                                    typename Lanes<kWidth>::Type* sum) {
  static_assert(kGroupSize == 8, "GroupSum adds eight positions");
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint32_t pair[4];
  std::memcpy(pair, p, sizeof(pair));
  *sum = ((LoadLanes<kWidth>(x, pair[0] & 0xffff) + LoadLanes<kWidth>(x, pair[0] >> 16)) +
          (LoadLanes<kWidth>(x, pair[1] & 0xffff) + LoadLanes<kWidth>(x, pair[1] >> 16))) +
         ((LoadLanes<kWidth>(x, pair[2] & 0xffff) + LoadLanes<kWidth>(x, pair[2] >> 16)) +
          (LoadLanes<kWidth>(x, pair[3] & 0xffff) + LoadLanes<kWidth>(x, pair[3] >> 16)));
#else
  *sum = ((LoadLanes<kWidth>(x, p[0]) + LoadLanes<kWidth>(x, p[1])) +
          (LoadLanes<kWidth>(x, p[2]) + LoadLanes<kWidth>(x, p[3]))) +
         ((LoadLanes<kWidth>(x, p[4]) + LoadLanes<kWidth>(x, p[5])) +
          (LoadLanes<kWidth>(x, p[6]) + LoadLanes<kWidth>(x, p[7])));
#endif
}

// One column run: the sum of x[row] * codebook[code] over its weights. A
// group gathers and adds its kGroupSize values of x, then multiplies once;
// singles multiply-add into eight independent partial sums (more than the
// multiply-add latency covers). For kWidth > 1, x holds the tile transposed
// (x[row * kWidth + t]) and every operation is a vector one. Kept out of
// line: with few live values the compiler holds everything in registers. Adds
// the dot product to *sum (vectors go by pointer, as in RowRunUpdate).
template <unsigned kWidth>
__attribute__((noinline)) void ColumnRunDot(const Run& run, const float* __restrict x, const float* __restrict codebook,
                                            typename Lanes<kWidth>::Type* sum) {
  typedef typename Lanes<kWidth>::Type Vec;
  const uint16_t* p = run.positions;
  Vec g0 = Vec{}, g1 = Vec{};
  uint32_t g = 0;
  Vec s0, s1;
  for (; g + 2 <= run.groups; g += 2, p += 2 * kGroupSize) {
    GroupSum<kWidth>(p, x, &s0);
    GroupSum<kWidth>(p + kGroupSize, x, &s1);
    g0 += codebook[run.group_codes[g]] * s0;
    g1 += codebook[run.group_codes[g + 1]] * s1;
  }
  if (g < run.groups) {
    GroupSum<kWidth>(p, x, &s0);
    g0 += codebook[run.group_codes[g]] * s0;
    p += kGroupSize;
  }
  const uint8_t* codes = run.single_codes;
  Vec a[8] = {Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}, Vec{}};
  for (; run.end - p >= 8; p += 8, codes += 8) {
    for (int u = 0; u < 8; ++u) a[u] += codebook[codes[u]] * LoadLanes<kWidth>(x, p[u]);
  }
  // The tail in a[0] (indexing a with a variable would keep a in memory).
  for (; p < run.end; ++p, ++codes) a[0] += codebook[*codes] * LoadLanes<kWidth>(x, *p);
  *sum += (g0 + g1) + (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
}

// Column runs, batch row count 1: each output accumulates its run of every
// row block in registers, gathering x through the positions.
inline void RunColumns(const ColumnTask& task) {
  const SparseWeights& w = *task.weights;
  const uint64_t n_count = w.out_features;
  float* __restrict y = task.y;
  for (uint64_t n = task.first_column; n < task.end_column; ++n) y[n] = 0.0f;
  for (uint32_t r = 0; r < w.num_row_blocks; ++r) {
    const float* x = task.x + uint64_t{r} * w.block_rows;
    const uint64_t first_run = uint64_t{r} * (n_count + 1);
    for (uint64_t n = task.first_column; n < task.end_column; ++n)
      ColumnRunDot<1>(RunAt(w, first_run + n), x, w.codebook.data(), y + n);
  }
  if (task.alpha != 1.0f || task.bias != nullptr || task.relu) {
    for (uint64_t n = task.first_column; n < task.end_column; ++n) y[n] = ApplyEpilogue(y[n], task, n);
  }
}

// Column runs, a tile of kWidth batch rows (x transposed): each weight drives
// vector operations over the tile.
template <unsigned kWidth>
void RunColumnTile(const ColumnTask& task) {
  typedef typename Lanes<kWidth>::Type Vec;
  const SparseWeights& w = *task.weights;
  const uint64_t n_count = w.out_features;
  for (uint64_t n = task.first_column; n < task.end_column; ++n) {
    Vec acc = Vec{};
    for (uint32_t r = 0; r < w.num_row_blocks; ++r) {
      const float* x = task.x + uint64_t{r} * w.block_rows * kWidth;
      ColumnRunDot<kWidth>(RunAt(w, uint64_t{r} * (n_count + 1) + n), x, w.codebook.data(), &acc);
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
