// libFuzzer target for the C++ container decoder (runtime/src/container.cc).
//
// Built by fuzz/build.sh with clang -fsanitize=fuzzer,address,undefined; run by
// fuzz/run.sh. The input is one container. Besides "no crash, no sanitizer
// report, no timeout, no out-of-memory", the target checks what the decoder
// promises (docs/FORMAT.md):
//   * a rejected container gets a one-line message holding a keyword of the
//     section 7 table;
//   * ReadContainerInfo and DecodeContainer agree (a header that fails the
//     first fails the second with the same message; a header that passes
//     leaves only the stream-content errors, checks 32 to 35);
//   * decoded symbols are inside their alphabets, sparse positions < numel;
//   * ExpandToDense writes exactly numel * itemsize bytes;
//   * decoding with several threads gives the same result or the same error;
//   * a small 2-D float32 container also goes through the operator library's
//     DCMatMul path (runtime/src/sparse_matmul.cc: BuildSparseWeights, then
//     SparseMatMul with the generic and, when the CPU has them, AVX2 kernels,
//     for batch sizes that use every tile width, with and without trans_b,
//     in both sparse orders (column runs and row runs), with and without relu):
//     the result must match a float64 product with the dense decoded weight.
// A failed check calls __builtin_trap(), which libFuzzer reports as a crash.
//
// Most random mutations would only ever exercise the CRC check, so the custom
// mutator below recomputes the checksum of 7 mutants out of 8: the saved
// corpus and crash files are exactly the bytes the decoder saw.
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "container.h"
#include "sparse_matmul.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

// The keywords of docs/FORMAT.md section 7, in table order (tests/test_fuzz_ci.py
// checks this list against the document).
const char* const kFormatKeywords[] = {
    "truncated",  "magic",      "version",    "checksum",     "dtype",          "layout",
    "weight bits", "index bits", "ndim",      "codebook size", "chunk_symbols", "overflow",
    "limit",      "entries",    "not finite", "mode",         "raw width",      "reserved",
    "table length", "nibble",   "empty code", "oversubscribed", "chunk_bits",   "padding",
    "trailing",   "invalid code word", "out of range", "position",
};
// Keywords of the checks made while decoding the streams (32 to 35).
const char* const kStreamKeywords[] = {"invalid code word", "chunk_bits", "out of range", "position"};

// Dense outputs up to this size are materialised (a valid 60-byte container
// may declare 2^30 zeros; allocating those is allowed but slow, not a bug).
constexpr uint64_t kMaxExpandBytes = uint64_t{1} << 24;

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

bool Contains(const std::string& text, const char* word) {
  // Case-insensitive search; keywords are lower case.
  const size_t n = std::strlen(word);
  if (n > text.size()) return false;
  for (size_t i = 0; i + n <= text.size(); ++i) {
    size_t k = 0;
    while (k < n && static_cast<char>(std::tolower(static_cast<unsigned char>(text[i + k]))) == word[k]) ++k;
    if (k == n) return true;
  }
  return false;
}

template <size_t N>
bool ContainsAny(const std::string& text, const char* const (&words)[N]) {
  for (const char* word : words)
    if (Contains(text, word)) return true;
  return false;
}

void CheckErrorMessage(const std::string& error) {
  Check(!error.empty());
  Check(error.find('\n') == std::string::npos);
  Check(ContainsAny(error, kFormatKeywords));
}

void CheckDecoded(const onnx_dc::DecodedContainer& decoded) {
  const onnx_dc::ContainerInfo& info = decoded.info;
  const bool sparse = info.layout == onnx_dc::Layout::kSparse;
  const size_t itemsize = onnx_dc::ItemSize(info.dtype);
  Check(itemsize != 0);
  Check(info.codebook_size <= (1u << info.bits));
  Check(decoded.codebook.size() == size_t{info.codebook_size} * itemsize);
  Check(decoded.codes.size() == info.entries);
  Check(decoded.gaps.size() == (sparse ? info.entries : 0));
  Check(info.entries <= info.numel);
  if (!sparse) Check(info.entries == info.numel);
  uint64_t position = 0;
  for (uint64_t i = 0; i < info.entries; ++i) {
    Check(decoded.codes[i] <= info.codebook_size);
    if (sparse) {
      Check(decoded.gaps[i] < (uint32_t{1} << info.index_bits));
      position += decoded.gaps[i];
      Check(position < info.numel);
      ++position;
    }
  }
  const uint64_t dense_bytes = info.numel * itemsize;
  if (dense_bytes <= kMaxExpandBytes) {
    // Exactly numel * itemsize bytes, so AddressSanitizer sees any overrun.
    std::unique_ptr<uint8_t[]> dense(dense_bytes ? new uint8_t[dense_bytes] : nullptr);
    onnx_dc::ExpandToDense(decoded, dense.get());
  }
}

// Weights up to this many elements, and this many rows and columns (an empty
// [0, 2^24] weight has no elements but 2^24 outputs per row), also run through
// the sparse matmul.
constexpr uint64_t kMaxMatMulElements = uint64_t{1} << 14;
constexpr uint64_t kMaxMatMulDim = uint64_t{1} << 12;

std::string SerialFor(void*, size_t total, void (*fn)(void*, size_t), void* context) {
  for (size_t i = 0; i < total; ++i) fn(context, i);
  return std::string();
}

// DCMatMul's computation on the decoded weight, against a float64 reference.
void CheckMatMul(const onnx_dc::DecodedContainer& decoded, const uint8_t* data, size_t size) {
  const onnx_dc::ContainerInfo& info = decoded.info;
  if (info.dtype != onnx_dc::DType::kFloat32 || info.dims.size() != 2 || info.numel > kMaxMatMulElements ||
      info.dims[0] > kMaxMatMulDim || info.dims[1] > kMaxMatMulDim)
    return;
  std::vector<float> dense(info.numel);
  onnx_dc::ExpandToDense(decoded, dense.data());
  double largest = 0.0;
  for (float v : dense) largest = std::max(largest, std::fabs(static_cast<double>(v)));
  const bool compare = largest < 1e30;  // larger weights may overflow float32 sums
  const onnx_dc::KernelIsa isas[] = {onnx_dc::KernelIsa::kGeneric, onnx_dc::DetectKernelIsa()};
  for (int variant = 0; variant < 4; ++variant) {
    const int trans_b = variant & 1;
    const onnx_dc::SparseOrder order = (variant & 2) ? onnx_dc::SparseOrder::kRows : onnx_dc::SparseOrder::kColumns;
    onnx_dc::SparseWeights weights;
    std::string error;
    if (!onnx_dc::BuildSparseWeights(decoded, trans_b != 0, order, &weights, &error)) {
      // Shape limits of the operator (e.g. a 2^40 x 0 weight), not format errors.
      Check(!error.empty() && error.find('\n') == std::string::npos);
      continue;
    }
    const uint64_t k_count = weights.in_features, n_count = weights.out_features;
    Check(k_count * n_count == info.numel);
    for (uint64_t rows : {uint64_t{1}, uint64_t{5}, uint64_t{17}}) {
      // Activations from the input bytes, a third of them zero; bias per column.
      std::vector<float> x(rows * k_count), bias(n_count ? n_count : 1), y(rows * n_count, NAN);
      for (size_t i = 0; i < x.size(); ++i) {
        const uint8_t b = data[(i * 7 + rows) % size];
        x[i] = b % 3 == 0 ? 0.0f : static_cast<float>(b) / 64.0f - 2.0f;
      }
      for (size_t j = 0; j < bias.size(); ++j) bias[j] = static_cast<float>(j % 5) - 2.0f;
      onnx_dc::MatMulArgs args;
      args.x = x.data();
      args.y = y.data();
      args.rows = rows;
      args.alpha = rows == 5 ? 0.5f : 1.0f;
      args.beta = 2.0f;
      args.bias = rows == 1 ? nullptr : bias.data();
      args.bias_size = rows == 17 ? 1 : n_count;
      args.relu = rows == 5;
      for (onnx_dc::KernelIsa isa : isas) {
        Check(onnx_dc::SparseMatMul(weights, args, isa, &SerialFor, nullptr).empty());
        for (uint64_t r = 0; compare && r < rows; ++r) {
          for (uint64_t n = 0; n < n_count; ++n) {
            double sum = 0.0, magnitude = 0.0;
            for (uint64_t k = 0; k < k_count; ++k) {
              const double w = trans_b ? dense[n * k_count + k] : dense[k * n_count + n];
              sum += static_cast<double>(x[r * k_count + k]) * w;
              magnitude += std::fabs(static_cast<double>(x[r * k_count + k]) * w);
            }
            double expected = args.alpha * sum;
            if (args.bias) expected += args.beta * static_cast<double>(args.bias[args.bias_size == 1 ? 0 : n]);
            if (args.relu) expected = std::max(expected, 0.0);
            const double tolerance = 1e-5 * (magnitude + 8.0) * (1.0 + static_cast<double>(k_count) / 64.0);
            Check(std::fabs(static_cast<double>(y[r * n_count + n]) - expected) <= tolerance);
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A copy of exactly `size` bytes: reads past the end hit ASan's redzone even
  // when libFuzzer's own buffer is larger.
  std::unique_ptr<uint8_t[]> copy(new uint8_t[size ? size : 1]);
  if (size) std::memcpy(copy.get(), data, size);

  // Default options, as the operator library uses them (threads = 0: chosen
  // from the size; small containers decode on the calling thread).
  const onnx_dc::DecodeOptions defaults;
  onnx_dc::ContainerInfo header;
  std::string header_error;
  const bool header_ok = onnx_dc::ReadContainerInfo(copy.get(), size, defaults, &header, &header_error);

  onnx_dc::DecodedContainer decoded;
  std::string error;
  const bool ok = onnx_dc::DecodeContainer(copy.get(), size, defaults, &decoded, &error);
  if (!header_ok) {
    CheckErrorMessage(header_error);
    Check(!ok && error == header_error);
    return 0;
  }
  if (!ok) {
    CheckErrorMessage(error);
    Check(ContainsAny(error, kStreamKeywords));
  } else {
    Check(decoded.info.dims == header.dims && decoded.info.entries == header.entries);
    CheckDecoded(decoded);
    CheckMatMul(decoded, copy.get(), size);
  }

  // The same container decoded by several threads (chunks split between them).
  const uint64_t nchunks =
      header.entries == 0 ? 0 : (header.entries - 1) / header.chunk_symbols + 1;
  if (nchunks >= 2) {
    onnx_dc::DecodeOptions threaded;
    threaded.threads = 3;
    onnx_dc::DecodedContainer again;
    std::string again_error;
    const bool again_ok = onnx_dc::DecodeContainer(copy.get(), size, threaded, &again, &again_error);
    Check(again_ok == ok);
    if (ok) {
      Check(again.codes == decoded.codes && again.gaps == decoded.gaps);
    } else {
      Check(again_error == error);
    }
  }
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  if (size >= 28 && seed % 8 != 0) {
    const uint32_t crc = onnx_dc::Crc32(data, size - 4);
    for (int i = 0; i < 4; ++i) data[size - 4 + i] = static_cast<uint8_t>(crc >> (8 * i));
  }
  return size;
}
