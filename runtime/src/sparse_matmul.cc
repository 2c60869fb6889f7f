// Builds the codebook-index layout of a weight and drives the kernels.
#include "sparse_matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "matmul_kernels.h"

namespace onnx_dc {

namespace {

static_assert(8 * kMaxBlockColumns <= kMaxTileFloats, "a tile of 8 rows must fit every block");
static_assert(kMaxBlockColumns <= 65536 && kMaxBlockRows <= 65536, "positions are 16-bit");

// The tile width for `rows` remaining batch rows: the smallest of 1, 4, 8, 16
// that holds them, narrowed until the accumulator (width x block columns
// floats) fits.
unsigned TileWidthFor(uint64_t rows, uint32_t block_columns) {
  unsigned width = 1;
  if (rows > 1) width = rows <= 4 ? 4 : rows <= 8 ? 8 : kMaxTileWidth;
  // Halve until the accumulator fits: 1, 4, 8 and 16 are the compiled widths.
  while (width > 4 && uint64_t{width} * block_columns > kMaxTileFloats) width /= 2;
  return width;
}

struct Tile {
  uint64_t first_row;
  unsigned rows;
  unsigned width;
  size_t x_offset;       // into the transposed scratch (width > 1)
  size_t active_offset;  // into the active-row scratch
  uint64_t num_active;
};

struct MatMulRun {
  const SparseWeights* weights;
  const MatMulArgs* args;
  void (*run_task)(const BlockTask&);
  void (*run_column_task)(const ColumnTask&);
  std::vector<Tile> tiles;
  std::vector<float> transposed;
  std::vector<uint32_t> active;
};

// Transposes one tile of X (width > 1) and lists its rows k with a nonzero
// activation; for width 1 only lists them. Column runs visit every row: they
// need neither list (nor, at width 1, the transposition).
void PrepareTile(void* context, size_t index) {
  MatMulRun& run = *static_cast<MatMulRun*>(context);
  Tile& tile = run.tiles[index];
  const uint64_t k_count = run.weights->in_features;
  const float* x = run.args->x + tile.first_row * k_count;
  const bool list_active = run.weights->order == SparseOrder::kRows || !run.weights->dense.empty();
  uint32_t* active = list_active ? run.active.data() + tile.active_offset : nullptr;
  uint64_t n = 0;
  if (tile.width == 1) {
    if (list_active) {
      for (uint64_t k = 0; k < k_count; ++k) {
        if (x[k] != 0.0f) active[n++] = static_cast<uint32_t>(k);
      }
    }
  } else {
    float* xt = run.transposed.data() + tile.x_offset;
    for (uint64_t k = 0; k < k_count; ++k) {
      bool nonzero = false;
      float* column = xt + k * tile.width;
      for (unsigned t = 0; t < tile.rows; ++t) {
        const float v = x[t * k_count + k];
        column[t] = v;
        nonzero |= (v != 0.0f);
      }
      for (unsigned t = tile.rows; t < tile.width; ++t) column[t] = 0.0f;
      if (nonzero && list_active) active[n++] = static_cast<uint32_t>(k);
    }
  }
  tile.num_active = n;
}

// The fields every task of `tile` shares.
void FillTileTask(const MatMulRun& run, const Tile& tile, TileTask* task) {
  const SparseWeights& w = *run.weights;
  const MatMulArgs& args = *run.args;
  task->weights = &w;
  task->x = tile.width == 1 ? args.x + tile.first_row * w.in_features : run.transposed.data() + tile.x_offset;
  task->tile_width = tile.width;
  task->tile_rows = tile.rows;
  task->y = args.y + tile.first_row * w.out_features;
  task->y_stride = w.out_features;
  task->alpha = args.alpha;
  task->beta = args.beta;
  task->relu = args.relu;
  task->bias = args.bias;
  task->bias_size = args.bias_size;
}

// A row-run task: tile index / block.
void RunTask(void* context, size_t index) {
  const MatMulRun& run = *static_cast<const MatMulRun*>(context);
  const Tile& tile = run.tiles[index / run.weights->num_blocks];
  BlockTask task;
  FillTileTask(run, tile, &task);
  task.block = static_cast<uint32_t>(index % run.weights->num_blocks);
  task.active_rows = run.active.data() + tile.active_offset;
  task.num_active_rows = tile.num_active;
  run.run_task(task);
}

// A column-run task: tile index / kColumnTaskColumns-wide range of columns.
void RunColumnRange(void* context, size_t index) {
  const MatMulRun& run = *static_cast<const MatMulRun*>(context);
  const uint64_t n_count = run.weights->out_features;
  const uint64_t ranges = (n_count + kColumnTaskColumns - 1) / kColumnTaskColumns;
  ColumnTask task;
  FillTileTask(run, run.tiles[index / ranges], &task);
  task.first_column = uint64_t{index % ranges} * kColumnTaskColumns;
  task.end_column = std::min<uint64_t>(task.first_column + kColumnTaskColumns, n_count);
  run.run_column_task(task);
}

}  // namespace

size_t SparseWeights::memory_bytes() const {
  return sizeof(*this) + codebook.capacity() * sizeof(float) + run_offsets.capacity() * sizeof(uint32_t) +
         group_offsets.capacity() * sizeof(uint32_t) + positions.capacity() * sizeof(uint16_t) +
         group_codes.capacity() + single_codes.capacity() + dense.capacity() * sizeof(float);
}

namespace {

// Reorders each run, given as w->positions (ascending inside each run) and
// w->single_codes (the codebook index of every position), into its groups and
// singles (see sparse_matmul.h) and fills the group codes and offsets. The
// singles' indices are written over the front of single_codes (never past
// the run being read), which then shrinks: no array of the weight's size is
// allocated besides the layout itself.
void GroupRuns(uint64_t blocks, uint64_t run_span, SparseWeights* w) {
  const uint32_t* offsets = w->run_offsets.data();
  uint8_t* codes = w->single_codes.data();
  uint64_t groups = 0;
  std::vector<uint32_t> count(256, 0);
  for (uint64_t run = 0; run < blocks * run_span; ++run) {
    if (run % run_span == run_span - 1) continue;  // a block's closing offset
    for (uint32_t i = offsets[run]; i < offsets[run + 1]; ++i) ++count[codes[i]];
    for (uint32_t i = offsets[run]; i < offsets[run + 1]; ++i) {
      groups += count[codes[i]] / kGroupSize;
      count[codes[i]] = 0;
    }
  }
  w->group_codes.assign(static_cast<size_t>(groups), 0);
  w->group_offsets.assign(w->run_offsets.size(), 0);
  std::vector<uint32_t> keys;
  uint64_t next_group = 0, next_single = 0;
  for (uint64_t b = 0; b < blocks; ++b) {
    for (uint64_t along = 0; along + 1 < run_span; ++along) {
      const uint64_t run = b * run_span + along;
      w->group_offsets[run] = static_cast<uint32_t>(next_group);
      uint16_t* out = w->positions.data() + offsets[run];
      keys.clear();
      for (uint32_t i = offsets[run]; i < offsets[run + 1]; ++i)
        keys.push_back((uint32_t{codes[i]} << 16) | w->positions[i]);
      std::sort(keys.begin(), keys.end());  // by index, then position
      // Groups first (each index's first multiples of kGroupSize), then the rest.
      size_t rest = 0;
      for (size_t p = 0; p < keys.size();) {
        const uint32_t code = keys[p] >> 16;
        size_t q = p;
        while (q < keys.size() && (keys[q] >> 16) == code) ++q;
        for (; q - p >= kGroupSize; p += kGroupSize) {
          for (unsigned j = 0; j < kGroupSize; ++j) *out++ = static_cast<uint16_t>(keys[p + j]);
          w->group_codes[next_group++] = static_cast<uint8_t>(code);
        }
        while (p < q) keys[rest++] = keys[p++];
      }
      for (size_t i = 0; i < rest; ++i) {
        *out++ = static_cast<uint16_t>(keys[i]);
        codes[next_single++] = static_cast<uint8_t>(keys[i] >> 16);
      }
    }
    w->group_offsets[b * run_span + run_span - 1] = static_cast<uint32_t>(next_group);
  }
  w->single_codes.resize(static_cast<size_t>(next_single));
  w->single_codes.shrink_to_fit();
}

}  // namespace

bool BuildSparseWeights(const DecodedContainer& decoded, bool trans_b, SparseOrder order, SparseWeights* out,
                        std::string* error) {
  const ContainerInfo& info = decoded.info;
  if (info.dtype != DType::kFloat32) {
    *error = std::string("the weight must be float32, the container holds ") + DTypeName(info.dtype);
    return false;
  }
  if (info.dims.size() != 2) {
    *error = "the weight must be 2-D, the container holds a " + std::to_string(info.dims.size()) + "-D tensor";
    return false;
  }
  if (info.codebook_size > 256) {
    *error = "the codebook must have at most 256 values, the container has " + std::to_string(info.codebook_size);
    return false;
  }
  const uint64_t rows = info.dims[0], cols = info.dims[1];
  const uint64_t k_count = trans_b ? cols : rows;
  const uint64_t n_count = trans_b ? rows : cols;
  if (k_count >= UINT32_MAX || n_count >= UINT32_MAX) {
    *error = "the weight's dimensions must be below 2^32 - 1";
    return false;
  }
  const uint32_t zero_symbol = info.codebook_size;
  uint64_t kept = 0;
  for (uint16_t c : decoded.codes) kept += (c != zero_symbol);
  if (kept >= UINT32_MAX) {
    *error = "the weight has 2^32 or more nonzero values";
    return false;
  }

  SparseWeights& w = *out;
  w.in_features = k_count;
  w.out_features = n_count;
  // As few blocks as the size limit allows, of equal size (balanced tasks).
  w.num_blocks = static_cast<uint32_t>((n_count + kMaxBlockColumns - 1) / kMaxBlockColumns);
  w.block_columns = w.num_blocks == 0 ? 1 : static_cast<uint32_t>((n_count + w.num_blocks - 1) / w.num_blocks);
  w.num_row_blocks = static_cast<uint32_t>((k_count + kMaxBlockRows - 1) / kMaxBlockRows);
  w.block_rows = w.num_row_blocks == 0 ? 1 : static_cast<uint32_t>((k_count + w.num_row_blocks - 1) / w.num_row_blocks);
  w.codebook.assign(256, 0.0f);
  if (info.codebook_size > 0) std::memcpy(w.codebook.data(), decoded.codebook.data(), info.codebook_size * sizeof(float));
  const uint64_t n_values = k_count * n_count;
  const bool dense_layout = n_values > 0 && static_cast<double>(kept) >= kDenseKeptFraction * static_cast<double>(n_values);
  w.order = order;

  // Visits the kept entries in order as (row, col) of the container's tensor.
  auto for_each_kept = [&](auto&& visit) {
    const bool sparse = info.layout == Layout::kSparse;
    uint64_t row = 0, col = 0;  // element after the previous entry
    for (uint64_t i = 0; i < info.entries; ++i) {
      if (sparse) {
        col += decoded.gaps[i];
        if (col >= cols) {
          row += col / cols;
          col %= cols;
        }
      }
      const uint16_t code = decoded.codes[i];
      if (code != zero_symbol) visit(row, col, code);
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
  };
  if (dense_layout) {
    // Panels of kDensePanelColumns columns, each [K][kDensePanelColumns]
    // (the last zero-padded); blocks are whole panels.
    const uint64_t panels = (n_count + kDensePanelColumns - 1) / kDensePanelColumns;
    w.block_columns = static_cast<uint32_t>((w.block_columns + kDensePanelColumns - 1) / kDensePanelColumns *
                                            kDensePanelColumns);
    w.dense.assign(static_cast<size_t>(panels * k_count * kDensePanelColumns), 0.0f);
    float* values = w.dense.data();
    const float* codebook = w.codebook.data();
    for_each_kept([&](uint64_t row, uint64_t col, uint16_t code) {
      const uint64_t k = trans_b ? col : row, n = trans_b ? row : col;
      const uint64_t panel = n / kDensePanelColumns;
      values[(panel * k_count + k) * kDensePanelColumns + n % kDensePanelColumns] = codebook[code];
    });
    return true;
  }
  // Row runs: a run is (output block, input row k), the position its column
  // inside the block. Column runs: a run is (row block, output column n), the
  // position its row inside the block. Either way runs are stored block by
  // block, each block's run_span - 1 runs in order, delimited by offsets.
  const bool row_runs = order == SparseOrder::kRows;
  const uint64_t run_span = row_runs ? k_count + 1 : n_count + 1;
  const uint64_t block_size = row_runs ? w.block_columns : w.block_rows;
  const uint64_t blocks = row_runs ? w.num_blocks : w.num_row_blocks;
  w.run_offsets.assign(static_cast<size_t>(blocks * run_span), 0);
  uint32_t* offsets = w.run_offsets.data();
  auto place = [&](uint64_t row, uint64_t col, uint64_t* run, uint32_t* position) {
    const uint64_t k = trans_b ? col : row, n = trans_b ? row : col;
    const uint64_t across = row_runs ? n : k, along = row_runs ? k : n;
    const uint64_t block = across / block_size;
    *run = block * run_span + along;
    *position = static_cast<uint32_t>(across - block * block_size);  // < 2^16
  };
  for_each_kept([&](uint64_t row, uint64_t col, uint16_t) {
    uint64_t run = 0;
    uint32_t position = 0;
    place(row, col, &run, &position);
    offsets[run + 1]++;
  });
  uint32_t total = 0;
  for (uint64_t b = 0; b < blocks; ++b) {
    uint32_t* block = offsets + b * run_span;
    block[0] = total;
    for (uint64_t i = 0; i + 1 < run_span; ++i) block[i + 1] += block[i];
    total = block[run_span - 1];
  }
  std::vector<uint32_t> cursor(offsets, offsets + blocks * run_span);
  w.positions.assign(static_cast<size_t>(kept), 0);
  w.single_codes.assign(static_cast<size_t>(kept), 0);
  for_each_kept([&](uint64_t row, uint64_t col, uint16_t code) {
    uint64_t run = 0;
    uint32_t position = 0;
    place(row, col, &run, &position);
    w.positions[cursor[run]] = static_cast<uint16_t>(position);
    w.single_codes[cursor[run]++] = static_cast<uint8_t>(code);  // code < codebook_size <= 256
  });
  cursor = std::vector<uint32_t>();
  GroupRuns(blocks, run_span, &w);
  return true;
}

bool BuildSparseWeights(const DecodedContainer& decoded, bool trans_b, SparseWeights* out, std::string* error) {
  return BuildSparseWeights(decoded, trans_b, SparseOrder::kColumns, out, error);
}

KernelIsa DetectKernelIsa() {
  const char* forced = std::getenv("ONNX_DC_KERNEL_ISA");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return KernelIsa::kGeneric;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return KernelIsa::kAvx2;
#endif
  return KernelIsa::kGeneric;
}

const char* KernelIsaName(KernelIsa isa) { return isa == KernelIsa::kAvx2 ? "avx2" : "generic"; }

std::string SparseMatMul(const SparseWeights& weights, const MatMulArgs& args, KernelIsa isa,
                         ParallelForFn parallel_for, void* runner) {
  if (args.rows == 0 || weights.out_features == 0) return std::string();
  MatMulRun run;
  run.weights = &weights;
  run.args = &args;
  const bool avx2 = isa == KernelIsa::kAvx2;
  run.run_task = avx2 ? &avx2::RunBlockTask : &generic::RunBlockTask;
  run.run_column_task = avx2 ? &avx2::RunColumnTask : &generic::RunColumnTask;
  const bool columns = weights.dense.empty() && weights.order == SparseOrder::kColumns;

  const uint64_t k_count = weights.in_features;
  size_t transposed_floats = 0;
  for (uint64_t first = 0; first < args.rows;) {
    const uint64_t left = args.rows - first;
    Tile tile{};
    tile.first_row = first;
    // Column-run tiles keep their accumulators in registers (no block-width
    // limit) and are at most 8 rows wide (eight 8-float partial sums).
    tile.width = columns ? std::min(TileWidthFor(left, 1), 8u) : TileWidthFor(left, weights.block_columns);
    tile.rows = static_cast<unsigned>(std::min<uint64_t>(tile.width, left));
    tile.x_offset = transposed_floats;
    tile.active_offset = run.tiles.size() * static_cast<size_t>(k_count);
    if (tile.width > 1) transposed_floats += static_cast<size_t>(k_count) * tile.width;
    run.tiles.push_back(tile);
    first += tile.rows;
  }
  run.transposed.resize(transposed_floats);
  if (!columns) run.active.resize(run.tiles.size() * static_cast<size_t>(k_count));

  std::string error;
  if (run.tiles.size() == 1) {
    PrepareTile(&run, 0);
  } else {
    error = parallel_for(runner, run.tiles.size(), &PrepareTile, &run);
    if (!error.empty()) return error;
  }
  if (columns) {
    const uint64_t ranges = (weights.out_features + kColumnTaskColumns - 1) / kColumnTaskColumns;
    return parallel_for(runner, run.tiles.size() * ranges, &RunColumnRange, &run);
  }
  return parallel_for(runner, run.tiles.size() * weights.num_blocks, &RunTask, &run);
}

}  // namespace onnx_dc
