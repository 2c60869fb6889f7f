// Decoder for the onnx-dc container format, version 1 (docs/FORMAT.md).
//
// A container is untrusted input (it comes from a model file a user loads):
// every field is validated, every read is bounds-checked, every size is
// checked for overflow before it is used, and errors come back as values with
// a one-line message. Nothing here throws except std::bad_alloc.
#ifndef ONNX_DC_RUNTIME_CONTAINER_H_
#define ONNX_DC_RUNTIME_CONTAINER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace onnx_dc {

// ONNX TensorProto.DataType numbers of the element types a container may hold.
enum class DType : uint8_t { kFloat32 = 1, kFloat16 = 10, kFloat64 = 11, kBFloat16 = 16 };

enum class Layout : uint8_t { kDense = 0, kSparse = 1 };

// Bytes per element of `dtype`.
size_t ItemSize(DType dtype);
// Lower-case name used in messages: "float32", "float16", "float64", "bfloat16".
const char* DTypeName(DType dtype);

// The largest number of elements a decoder accepts unless told otherwise
// (2^30, as onnx_dc.codec.container.DEFAULT_MAX_ELEMENTS). Checked before anything
// is allocated.
constexpr uint64_t kDefaultMaxElements = uint64_t{1} << 30;

struct DecodeOptions {
  uint64_t max_elements = kDefaultMaxElements;
  // Number of threads used to decode chunks; 0 picks one from the hardware and
  // the container size, 1 decodes on the calling thread only.
  unsigned threads = 0;
};

// The validated header of a container.
struct ContainerInfo {
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kDense;
  unsigned bits = 0;        // weight bits b (1..8)
  unsigned index_bits = 0;  // sparse: 1..16; dense: 0
  std::vector<uint64_t> dims;
  uint64_t numel = 1;
  uint32_t codebook_size = 0;  // K; code symbol K is the zero symbol
  uint32_t chunk_symbols = 0;
  uint64_t entries = 0;  // N
};

// A decoded container: the codebook and the entries in order.
struct DecodedContainer {
  ContainerInfo info;
  // K values, little-endian, ItemSize(info.dtype) bytes each.
  std::vector<uint8_t> codebook;
  // Code symbol of each entry, 0..K (K = the element is +0.0).
  std::vector<uint16_t> codes;
  // Sparse layout: gap symbol of each entry (position advance minus one).
  // Empty for the dense layout.
  std::vector<uint16_t> gaps;
};

// Parses and validates everything but the stream payloads. On failure returns
// false and sets *error to a one-line message.
bool ReadContainerInfo(const uint8_t* data, size_t size, const DecodeOptions& options,
                       ContainerInfo* info, std::string* error);

// Validates the whole container and decodes both streams. Every position of a
// sparse container is checked to be < numel. On failure returns false, sets
// *error and leaves *out in an unspecified (but valid) state.
bool DecodeContainer(const uint8_t* data, size_t size, const DecodeOptions& options,
                     DecodedContainer* out, std::string* error);

// A container validated once (by a successful DecodeContainer of the same
// bytes) whose streams are then decoded one chunk at a time straight from the
// caller's bytes, which must outlive it. For kernels that keep only the
// compressed weight in memory: besides the bytes it holds the streams' chunk
// tables, their Huffman lookup tables and one position per chunk.
class ChunkedContainer {
 public:
  ChunkedContainer();
  ~ChunkedContainer();
  ChunkedContainer(ChunkedContainer&&) noexcept;
  ChunkedContainer& operator=(ChunkedContainer&&) noexcept;

  // `decoded` must be the successful DecodeContainer of (data, size). Returns
  // false with a one-line *error otherwise.
  bool Open(const uint8_t* data, size_t size, const DecodedContainer& decoded, std::string* error);
  const ContainerInfo& info() const;
  uint64_t num_chunks() const;
  // Decodes chunk j: the code symbol and the element position (row-major
  // index into the tensor) of each of its entries, fillers included (code
  // symbol K); `gaps` is scratch space. Each array holds info().chunk_symbols
  // values. Returns the number of entries.
  uint64_t DecodeChunk(uint64_t j, uint16_t* codes, uint64_t* positions, uint16_t* gaps) const;
  // Bytes held besides the container's.
  size_t memory_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes the dense tensor (row-major, numel elements of the container's dtype)
// into `out`, which must hold numel * itemsize bytes (null is fine for an
// empty tensor). `decoded` must come from a successful DecodeContainer.
void ExpandToDense(const DecodedContainer& decoded, void* out);

// CRC-32 (ISO-HDLC / zlib) of `size` bytes.
uint32_t Crc32(const uint8_t* data, size_t size);

}  // namespace onnx_dc

#endif  // ONNX_DC_RUNTIME_CONTAINER_H_
