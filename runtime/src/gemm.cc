// Builds the code-panel layout of a weight and drives the panel GEMM kernels.
#include "gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace onnx_dc {

namespace {

// Every task decodes its panel once, so kPanelTaskRows rows amortise the
// decoding, and [rows][kPanelDepth] floats of X (168 KiB) stay in L2 while
// the panel's blocks stream.
constexpr uint64_t kTaskRows = kPanelTaskRows;

struct GemmRun {
  const PanelWeights* weights;
  const GemmArgs* args;
  void (*run)(const PanelTask&);
  uint64_t row_blocks;
  unsigned tile_rows;
  float* packed;
};

// Packs tile `index` of X (tile_rows rows, zero past the end).
void PackTile(void* context, size_t index) {
  const GemmRun& run = *static_cast<const GemmRun*>(context);
  const uint64_t k_count = run.weights->in_features;
  const unsigned mr = run.tile_rows;
  const uint64_t first = uint64_t{index} * mr;
  const unsigned rows = static_cast<unsigned>(std::min<uint64_t>(mr, run.args->rows - first));
  float* out = run.packed + uint64_t{index} * k_count * mr;
  const float* x = run.args->x + first * k_count;
  for (uint64_t k = 0; k < k_count; ++k) {
    float* column = out + k * mr;
    for (unsigned r = 0; r < rows; ++r) column[r] = x[r * k_count + k];
    for (unsigned r = rows; r < mr; ++r) column[r] = 0.0f;
  }
}

void RunTask(void* context, size_t index) {
  const GemmRun& run = *static_cast<const GemmRun*>(context);
  const uint64_t panels = run.weights->panels;
  PanelTask task;
  task.weights = run.weights;
  task.args = run.args;
  task.packed_x = run.packed;
  task.panel = index % panels;
  task.first_row = uint64_t{index / panels} * kTaskRows;
  task.end_row = std::min<uint64_t>(task.first_row + kTaskRows, run.args->rows);
  run.run(task);
}

// The value of a codebook entry (float32 container) as a float.
float CodebookValue(const DecodedContainer& decoded, uint32_t i) {
  float v;
  std::memcpy(&v, decoded.codebook.data() + size_t{i} * sizeof(float), sizeof(float));
  return v;
}

// bfloat16 bits of a finite float, rounded to nearest even.
uint32_t BFloat16Bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

float BFloat16Value(uint32_t bf16) {
  const uint32_t bits = bf16 << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// AMX tasks: tiles of 16 rows, the product in bf16 passes.
constexpr uint64_t kAmxTileRows = 16;
// Below this many rows the float kernels are used (AMX tiles hold 16 rows).
constexpr uint64_t kAmxMinRows = 16;

void PackTileAmxTask(void* context, size_t index) {
  const GemmRun& run = *static_cast<const GemmRun*>(context);
  avx512::PackTileAmx(run.args->x, run.args->rows, run.weights->in_features, index,
                      reinterpret_cast<uint16_t*>(run.packed));
}

}  // namespace

// AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID leaf 7; not every compiler's
// __builtin_cpu_supports knows them).
bool HasAmxBf16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d & (1u << 24)) != 0 && (d & (1u << 22)) != 0;
  if (!amx || a < 1) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a & (1u << 5)) != 0;
#else
  return false;
#endif
}

// Linux hands out the AMX tile state only to a process that asked for it
// (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); asking again is a
// no-op, and onnxruntime's own int8 kernels ask the same on these CPUs.
bool RequestAmxPermission() {
#if defined(__linux__) && defined(__x86_64__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtileData = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#else
  return false;
#endif
}

bool ParseActivation(const std::string& name, Activation* out) {
  if (name.empty() || name == "none") {
    *out = Activation::kNone;
  } else if (name == "relu") {
    *out = Activation::kRelu;
  } else if (name == "gelu") {
    *out = Activation::kGelu;
  } else if (name == "gelu_tanh") {
    *out = Activation::kGeluTanh;
  } else {
    return false;
  }
  return true;
}

const char* ActivationName(Activation activation) {
  switch (activation) {
    case Activation::kNone:
      return "none";
    case Activation::kRelu:
      return "relu";
    case Activation::kGelu:
      return "gelu";
    case Activation::kGeluTanh:
      return "gelu_tanh";
  }
  return "?";
}

bool PanelsPossible(const DecodedContainer& decoded) {
  const ContainerInfo& info = decoded.info;
  if (info.dtype != DType::kFloat32 || info.dims.size() != 2 || info.codebook_size > 256) return false;
  if (info.codebook_size < 256) return true;
  for (uint32_t i = 0; i < info.codebook_size; ++i) {
    if (CodebookValue(decoded, i) == 0.0f) return true;
  }
  // A full 8-bit codebook without 0: only a weight with nothing pruned fits.
  uint64_t kept = 0;
  for (uint16_t c : decoded.codes) kept += (c != info.codebook_size);
  return kept == info.numel;
}

bool BuildPanelWeights(const DecodedContainer& decoded, bool trans_b, GemmIsa isa, PanelWeights* out,
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
  if (!PanelsPossible(decoded)) {
    *error = "the weight has pruned values but its 256-value codebook has no 0";
    return false;
  }
  const uint64_t rows = info.dims[0], cols = info.dims[1];
  const uint64_t k_count = trans_b ? cols : rows;
  const uint64_t n_count = trans_b ? rows : cols;
  if (k_count >= UINT32_MAX || n_count >= UINT32_MAX) {
    *error = "the weight's dimensions must be below 2^32 - 1";
    return false;
  }
  PanelWeights& w = *out;
  w.in_features = k_count;
  w.out_features = n_count;
  w.panels = (n_count + kPanelColumns - 1) / kPanelColumns;
  w.codebook.assign(256, 0.0f);
  const uint32_t zero_symbol = info.codebook_size;
  for (uint32_t i = 0; i < info.codebook_size; ++i) w.codebook[i] = CodebookValue(decoded, i);
  uint32_t zero_code = zero_symbol;  // codebook[K] = 0 when K < 256
  if (zero_symbol >= 256) {
    zero_code = 0;
    for (uint32_t i = 0; i < info.codebook_size; ++i) {
      if (w.codebook[i] == 0.0f) {
        zero_code = i;
        break;
      }
    }
  }
  w.zero_code = static_cast<uint8_t>(zero_code);
  // The largest index: the largest code symbol below the zero symbol, and
  // the zero index when something is pruned or padded.
  uint32_t limit = 1;
  bool pruned = info.layout == Layout::kSparse && info.entries < info.numel;
  for (uint16_t c : decoded.codes) {
    if (c != zero_symbol) {
      limit = std::max<uint32_t>(limit, uint32_t{c} + 1);
    } else {
      pruned = true;
    }
  }
  if (pruned || n_count % kPanelColumns != 0) limit = std::max<uint32_t>(limit, zero_code + 1);
  // The decoders zero the lanes of index 16 (32) by its bit 4 (5) when it is
  // the only index at or above 16 (32): that needs the zero index there.
  if ((limit == 17 || limit == 33) && zero_code != limit - 1) limit = limit == 17 ? 32 : 64;
  w.code_limit = limit;
  w.plane_order = isa >= GemmIsa::kAvx512Vbmi && limit > 64;
  if (isa == GemmIsa::kAmx) {
    w.split_codebook.resize(256);
    for (unsigned i = 0; i < 256; ++i) {
      const uint32_t hi = BFloat16Bits(w.codebook[i]);
      const float rest = w.codebook[i] - BFloat16Value(hi);
      w.split_codebook[i] = hi | (BFloat16Bits(rest) << 16);
    }
  }
  const uint64_t k_rows = w.plane_order ? (k_count + 1) / 2 * 2 : k_count;  // even with plane order
  w.codes.assign(static_cast<size_t>(w.panels * k_rows * kPanelColumns), w.zero_code);
  uint8_t* codes = w.codes.data();
  const bool sparse = info.layout == Layout::kSparse;
  uint64_t row = 0, col = 0, kept = 0;
  for (uint64_t i = 0; i < info.entries; ++i) {
    if (sparse) {
      col += decoded.gaps[i];
      if (col >= cols) {
        row += col / cols;
        col %= cols;
      }
    }
    const uint16_t code = decoded.codes[i];
    if (code != zero_symbol) {
      const uint64_t k = trans_b ? col : row, n = trans_b ? row : col;
      uint64_t at = ((n / kPanelColumns) * k_rows + k) * kPanelColumns + n % kPanelColumns;
      if (w.plane_order) {
        // Natural position 16 q + 4 L + e of its chunk of 64 goes to 16 L + 4 q + e.
        const uint64_t j = at % 64, q = j / 16, l = (j / 4) % 4, e = j % 4;
        at = at - j + 16 * l + 4 * q + e;
      }
      codes[at] = static_cast<uint8_t>(code);
      ++kept;
    }
    if (++col == cols) {
      col = 0;
      ++row;
    }
  }
  w.kept = kept;
  return true;
}

GemmIsa DetectGemmIsa(bool allow_amx) {
  const char* forced = std::getenv("ONNX_DC_KERNEL_ISA");
  GemmIsa cap = GemmIsa::kAmx;
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) cap = GemmIsa::kGeneric;
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0) cap = GemmIsa::kAvx2;
  if (forced != nullptr && std::strcmp(forced, "avx512") == 0) cap = GemmIsa::kAvx512;
  if (forced != nullptr && std::strcmp(forced, "vbmi") == 0) cap = GemmIsa::kAvx512Vbmi;
  if (forced != nullptr && std::strcmp(forced, "amx") == 0) cap = GemmIsa::kAmx;
  GemmIsa best = GemmIsa::kGeneric;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = GemmIsa::kAvx2;
  if (best == GemmIsa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = GemmIsa::kAvx512;
  if (best == GemmIsa::kAvx512 && __builtin_cpu_supports("avx512vbmi")) best = GemmIsa::kAvx512Vbmi;
  if (best == GemmIsa::kAvx512Vbmi && cap == GemmIsa::kAmx && allow_amx && HasAmxBf16() && RequestAmxPermission())
    best = GemmIsa::kAmx;
#endif
  return std::min(best, cap);
}

unsigned PanelTileRows(GemmIsa isa) {
  static_assert(kPanelTaskRows % 14 == 0 && kPanelTaskRows % 6 == 0 && kPanelTaskRows % 4 == 0 &&
                    kPanelTaskRows % 16 == 0,
                "tasks hold whole tiles (AMX: of 16 rows)");
  return isa >= GemmIsa::kAvx512 ? 14 : isa == GemmIsa::kAvx2 ? 6 : 4;
}

const char* GemmIsaName(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kGeneric:
      return "generic";
    case GemmIsa::kAvx2:
      return "avx2";
    case GemmIsa::kAvx512:
      return "avx512";
    case GemmIsa::kAvx512Vbmi:
      return "avx512vbmi";
    case GemmIsa::kAmx:
      return "amx";
  }
  return "?";
}

void ApplyActivation(float* y, uint64_t count, Activation activation, GemmIsa isa) {
  if (activation == Activation::kNone || count == 0) return;
  if (isa >= GemmIsa::kAvx512) {
    avx512::ApplyActivationTo(y, count, activation);
  } else if (isa == GemmIsa::kAvx2) {
    avx2::ApplyActivationTo(y, count, activation);
  } else {
    generic::ApplyActivationTo(y, count, activation);
  }
}

std::string PanelGemm(const PanelWeights& weights, const GemmArgs& args, GemmIsa isa, ParallelForFn parallel_for,
                      void* runner) {
  if (args.rows == 0 || weights.out_features == 0) return std::string();
  GemmRun run;
  run.weights = &weights;
  run.args = &args;
  if (isa == GemmIsa::kAmx && !weights.split_codebook.empty() && args.rows >= kAmxMinRows &&
      weights.in_features > 0) {
    run.run = &avx512::RunPanelTaskAmx;
    run.row_blocks = (args.rows + kTaskRows - 1) / kTaskRows;
    const uint64_t tiles = (args.rows + kAmxTileRows - 1) / kAmxTileRows;
    const uint64_t ksteps = (weights.in_features + 31) / 32;
    // tiles * 16 rows * ksteps * 32 * 2 bf16: X's own bytes plus up to 15 rows and 31 columns.
    std::vector<float> packed(static_cast<size_t>(tiles * ksteps * 512));
    run.packed = packed.data();
    std::string error = parallel_for(runner, static_cast<size_t>(tiles), &PackTileAmxTask, &run);
    if (!error.empty()) return error;
    return parallel_for(runner, static_cast<size_t>(run.row_blocks * weights.panels), &RunTask, &run);
  }
  run.run = weights.plane_order        ? &avx512::RunPanelTaskVbmi  // built for kAvx512Vbmi only
            : isa >= GemmIsa::kAvx512 ? &avx512::RunPanelTask
            : isa == GemmIsa::kAvx2   ? &avx2::RunPanelTask
                                      : &generic::RunPanelTask;
  run.row_blocks = (args.rows + kTaskRows - 1) / kTaskRows;
  run.tile_rows = PanelTileRows(isa);
  const uint64_t tiles = (args.rows + run.tile_rows - 1) / run.tile_rows;
  std::vector<float> packed;
  // The AVX-512 kernels read X in place for tasks of at most 3 rows (gemm_kernels_avx512.cc: kFewRows).
  const bool few_rows = isa >= GemmIsa::kAvx512 && args.rows <= 3;
  if (weights.in_features > 0 && !few_rows) {
    // tiles * tile_rows * K floats: at most (rows + 13) * K, X's own size plus 13 rows.
    packed.resize(static_cast<size_t>(tiles * run.tile_rows * weights.in_features));
    run.packed = packed.data();
    std::string error = parallel_for(runner, static_cast<size_t>(tiles), &PackTile, &run);
    if (!error.empty()) return error;
  } else {
    run.packed = nullptr;
  }
  return parallel_for(runner, static_cast<size_t>(run.row_blocks * weights.panels), &RunTask, &run);
}

}  // namespace onnx_dc
