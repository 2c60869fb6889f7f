// DCMatMul on a weight kept compressed (see resident_matmul.h).
#include "resident_matmul.h"

#include <algorithm>
#include <cstring>

namespace onnx_dc {

namespace {

// Tasks per run: fixed, so that the summation order (and the result) does not
// depend on the number of threads.
constexpr uint64_t kTasks = 8;
// Rows of X handled per pass over the chunks (the per-task buffers hold
// kTasks x kTileRows x N floats).
constexpr uint64_t kTileRows = 32;

uint64_t KeptCount(const DecodedContainer& decoded) {
  const uint16_t zero = static_cast<uint16_t>(decoded.info.codebook_size);
  uint64_t kept = 0;
  for (uint16_t c : decoded.codes) kept += (c != zero);
  return kept;
}

struct RunContext {
  const ResidentWeights* weights;
  const float* x;       // first row of the tile, [tile_rows, K]
  uint64_t tile_rows;
  float* partial;       // kTasks buffers of [tile_rows, N]
  uint64_t chunks;
  uint64_t tasks;
};

void RunTask(void* context, size_t task) {
  const RunContext& run = *static_cast<const RunContext*>(context);
  const ResidentWeights& w = *run.weights;
  const ChunkedContainer& container = w.container;
  const ContainerInfo& info = container.info();
  const uint64_t k_count = w.in_features, n_count = w.out_features;
  const uint64_t cols = info.dims[1];  // of the stored tensor: N, or K with trans_b
  const uint64_t first = run.chunks * task / run.tasks, last = run.chunks * (task + 1) / run.tasks;
  float* acc = run.partial + task * run.tile_rows * n_count;
  std::vector<uint16_t> codes(info.chunk_symbols), gaps(info.chunk_symbols);
  std::vector<uint64_t> positions(info.chunk_symbols);
  const float* codebook = w.codebook.data();
  const uint16_t zero = static_cast<uint16_t>(info.codebook_size);
  const float* x = run.x;
  const uint64_t tile_rows = run.tile_rows;
  for (uint64_t j = first; j < last; ++j) {
    const uint64_t n = container.DecodeChunk(j, codes.data(), positions.data(), gaps.data());
    if (n == 0) continue;
    uint64_t row = positions[0] / cols, col = positions[0] % cols, at = positions[0];
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t p = positions[i];
      col += p - at;  // positions increase: move (row, col) forward
      at = p;
      if (col >= cols) {
        row += col / cols;
        col %= cols;
      }
      const uint16_t code = codes[i];
      if (code == zero) continue;
      const float value = codebook[code];
      const uint64_t k = w.trans_b ? col : row;
      const uint64_t out = w.trans_b ? row : col;
      if (tile_rows == 1) {
        acc[out] += x[k] * value;
      } else {
        for (uint64_t m = 0; m < tile_rows; ++m) acc[m * n_count + out] += x[m * k_count + k] * value;
      }
    }
  }
}

}  // namespace

uint64_t EstimatedLayoutBytes(const DecodedContainer& decoded, bool panels) {
  const ContainerInfo& info = decoded.info;
  if (info.dims.size() != 2) return 0;
  const uint64_t k = info.dims[0], n = info.dims[1];
  const uint64_t wide = std::max(k, n), narrow = std::min(k, n);  // panels pad the output dimension to 32
  const uint64_t padded = ((wide + kDensePanelColumns - 1) / kDensePanelColumns) * kDensePanelColumns * narrow;
  if (panels) return padded;  // code panels (gemm.h): one index byte per weight
  const uint64_t kept = KeptCount(decoded);
  if (info.numel > 0 && static_cast<double>(kept) >= kDenseKeptFraction * static_cast<double>(info.numel))
    return 4 * padded;  // dense float32 panels of the index layout's builder
  // Index layout: a 16-bit position and (at most) an index byte per kept weight, 8 bytes per run.
  return 3 * kept + 8 * (k + n);
}

bool PreferResident(const DecodedContainer& decoded, size_t container_size, bool panels) {
  const uint64_t layout = EstimatedLayoutBytes(decoded, panels);
  return layout > kResidentMinLayoutBytes && 2 * layout > 3 * uint64_t{container_size};
}

size_t ResidentWeights::memory_bytes() const {
  return sizeof(*this) + codebook.capacity() * sizeof(float) + container.memory_bytes();
}

bool BuildResidentWeights(const uint8_t* data, size_t size, const DecodedContainer& decoded, bool trans_b,
                          ResidentWeights* out, std::string* error) {
  const ContainerInfo& info = decoded.info;
  if (info.dtype != DType::kFloat32) {
    *error = std::string("the weight must be float32, the container holds ") + DTypeName(info.dtype);
    return false;
  }
  if (info.dims.size() != 2) {
    *error = "the weight must be 2-D, the container holds a " + std::to_string(info.dims.size()) + "-D tensor";
    return false;
  }
  if (!out->container.Open(data, size, decoded, error)) return false;
  out->trans_b = trans_b;
  out->in_features = trans_b ? info.dims[1] : info.dims[0];
  out->out_features = trans_b ? info.dims[0] : info.dims[1];
  out->codebook.assign(info.codebook_size + 1, 0.0f);
  if (info.codebook_size > 0) std::memcpy(out->codebook.data(), decoded.codebook.data(), info.codebook_size * 4);
  return true;
}

std::string ResidentMatMul(const ResidentWeights& weights, const MatMulArgs& args, ParallelForFn parallel_for,
                           void* runner) {
  const uint64_t n_count = weights.out_features;
  const uint64_t chunks = weights.container.num_chunks();
  const uint64_t tasks = std::max<uint64_t>(1, std::min(kTasks, chunks));
  std::vector<float> partial;
  for (uint64_t first_row = 0; first_row < args.rows; first_row += kTileRows) {
    const uint64_t tile_rows = std::min(kTileRows, args.rows - first_row);
    partial.assign(tasks * tile_rows * n_count, 0.0f);
    RunContext run{&weights, args.x + first_row * weights.in_features, tile_rows, partial.data(), chunks, tasks};
    if (chunks > 0) {
      std::string error = parallel_for(runner, tasks, &RunTask, &run);
      if (!error.empty()) return error;
    }
    float* y = args.y + first_row * n_count;
    for (uint64_t m = 0; m < tile_rows; ++m) {
      for (uint64_t n = 0; n < n_count; ++n) {
        float acc = 0.0f;
        for (uint64_t t = 0; t < tasks; ++t) acc += partial[(t * tile_rows + m) * n_count + n];
        float value = args.alpha * acc;
        if (args.bias != nullptr) value += args.beta * args.bias[args.bias_size == 1 ? 0 : n];
        if (args.relu && value < 0.0f) value = 0.0f;
        y[m * n_count + n] = value;
      }
    }
  }
  return std::string();
}

}  // namespace onnx_dc
