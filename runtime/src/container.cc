// Decoder for the onnx-dc container format, version 1. The section numbers in
// comments refer to docs/FORMAT.md.
#include "container.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>

namespace onnx_dc {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the decoder copies little-endian codebook bytes as host values");

namespace {

constexpr size_t kHeaderBytes = 24;
constexpr size_t kCrcBytes = 4;
constexpr unsigned kMaxNdim = 8;
constexpr unsigned kMaxHuffmanLength = 15;
constexpr unsigned kMaxRawWidth = 16;
// Containers with fewer entries than this are decoded on the calling thread.
constexpr uint64_t kSymbolsPerThread = uint64_t{1} << 18;
constexpr unsigned kMaxDecodeThreads = 8;

// ---------------------------------------------------------------- CRC-32

struct CrcTables {
  uint32_t t[8][256];
};

constexpr CrcTables MakeCrcTables() {
  CrcTables tables{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
    tables.t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i) {
    for (int s = 1; s < 8; ++s) {
      const uint32_t prev = tables.t[s - 1][i];
      tables.t[s][i] = (prev >> 8) ^ tables.t[0][prev & 0xFF];
    }
  }
  return tables;
}

constexpr CrcTables kCrcTables = MakeCrcTables();

// ---------------------------------------------------------------- helpers

uint16_t LoadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t LoadU32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
uint64_t LoadU64(const uint8_t* p) { return uint64_t{LoadU32(p)} | (uint64_t{LoadU32(p + 4)} << 32); }

std::string Hex32(uint32_t v) {
  static const char digits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int shift = 28; shift >= 0; shift -= 4) s += digits[(v >> shift) & 0xF];
  return s;
}

// Sequential reader over the container bytes that never reads past the end.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t offset() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }
  // Returns a pointer to the next n bytes and advances, or nullptr if fewer remain.
  const uint8_t* Take(uint64_t n) {
    if (n > remaining()) return nullptr;
    const uint8_t* p = data_ + pos_;
    pos_ += static_cast<size_t>(n);
    return p;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

bool Fail(std::string* error, std::string message) {
  *error = std::move(message);
  return false;
}

bool IsFiniteValue(DType dtype, const uint8_t* p) {
  switch (dtype) {
    case DType::kFloat32:
      return (LoadU32(p) & 0x7F800000u) != 0x7F800000u;
    case DType::kFloat64:
      return (LoadU64(p) & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
    case DType::kFloat16:
      return (LoadU16(p) & 0x7C00u) != 0x7C00u;
    case DType::kBFloat16:
      return (LoadU16(p) & 0x7F80u) != 0x7F80u;
  }
  return false;
}

// ---------------------------------------------------------------- streams

// One validated stream descriptor (section 3.4) plus what decoding needs.
struct Stream {
  const char* name = "";
  uint32_t alphabet = 0;  // A
  bool huffman = false;
  unsigned raw_width = 0;
  unsigned min_len = 0;
  unsigned max_len = 0;
  std::vector<uint8_t> lengths;      // Huffman code length of symbols 0..L-1
  std::vector<uint32_t> chunk_bits;  // per chunk
  std::vector<uint64_t> chunk_start;  // bit offset of each chunk in the payload
  uint64_t total_bits = 0;
  const uint8_t* payload = nullptr;
  size_t payload_size = 0;
  // Huffman lookup: index = the next max_len bits; value = symbol | length << 16
  // (length 0: no code word starts with these bits).
  std::vector<uint32_t> table;
};

bool ReadStreamDescriptor(ByteReader* reader, Stream* stream, uint64_t entries,
                          uint32_t chunk_symbols, std::string* error) {
  const std::string name = stream->name;
  const uint8_t* fixed = reader->Take(8);
  if (!fixed) return Fail(error, "truncated container: the " + name + " descriptor runs past the checksum");
  const unsigned mode = fixed[0];
  const unsigned raw_width = fixed[1];
  const unsigned reserved = LoadU16(fixed + 2);
  const uint32_t table_length = LoadU32(fixed + 4);
  if (mode > 1) return Fail(error, name + ": unknown stream mode " + std::to_string(mode) + " (0 = raw, 1 = Huffman)");
  if (mode == 0 && (raw_width < 1 || raw_width > kMaxRawWidth))
    return Fail(error, name + ": raw width " + std::to_string(raw_width) + " is outside 1..16");
  if (mode == 1 && raw_width != 0)
    return Fail(error, name + ": raw width must be 0 in Huffman mode, got " + std::to_string(raw_width));
  if (reserved != 0) return Fail(error, name + ": reserved field is " + std::to_string(reserved) + ", must be 0");
  if (mode == 0) {
    if (table_length != 0)
      return Fail(error, name + ": table length must be 0 in raw mode, got " + std::to_string(table_length));
    stream->huffman = false;
    stream->raw_width = raw_width;
    stream->min_len = stream->max_len = raw_width;
  } else {
    if (table_length < 1 || table_length > stream->alphabet)
      return Fail(error, name + ": table length " + std::to_string(table_length) + " is outside 1.." +
                             std::to_string(stream->alphabet) + " (the alphabet size)");
    const uint8_t* packed = reader->Take((uint64_t{table_length} + 1) / 2);
    if (!packed) return Fail(error, "truncated container: the " + name + " code-length table runs past the checksum");
    stream->huffman = true;
    stream->lengths.resize(table_length);
    for (uint32_t s = 0; s < table_length; ++s) {
      const uint8_t byte = packed[s / 2];
      stream->lengths[s] = static_cast<uint8_t>((s % 2 == 0) ? (byte & 0x0F) : (byte >> 4));
    }
    if (table_length % 2 == 1 && (packed[table_length / 2] >> 4) != 0)
      return Fail(error, name + ": the unused high nibble of the last code-length byte is not 0");
    // Kraft sum in units of 2^-15: sum(2^(15 - len)) must be <= 2^15.
    uint64_t kraft = 0;
    unsigned min_len = kMaxHuffmanLength + 1, max_len = 0;
    for (uint8_t len : stream->lengths) {
      if (len == 0) continue;  // lengths are 4-bit, so already <= 15
      kraft += uint64_t{1} << (kMaxHuffmanLength - len);
      min_len = std::min<unsigned>(min_len, len);
      max_len = std::max<unsigned>(max_len, len);
    }
    if (max_len == 0) return Fail(error, name + ": Huffman table is an empty code: every code length is zero");
    if (kraft > (uint64_t{1} << kMaxHuffmanLength))
      return Fail(error, name + ": Huffman code lengths are oversubscribed (Kraft sum above 1)");
    stream->min_len = min_len;
    stream->max_len = max_len;
  }

  const uint64_t nchunks = entries == 0 ? 0 : (entries - 1) / chunk_symbols + 1;
  if (nchunks > reader->remaining() / 4)
    return Fail(error, "truncated container: the " + name + " chunk table (" + std::to_string(nchunks) +
                           " chunks) runs past the checksum");
  const uint8_t* table = reader->Take(nchunks * 4);
  stream->chunk_bits.resize(static_cast<size_t>(nchunks));
  stream->chunk_start.resize(static_cast<size_t>(nchunks));
  uint64_t total = 0;
  for (uint64_t j = 0; j < nchunks; ++j) {
    const uint32_t bits = LoadU32(table + 4 * j);
    const uint64_t n = std::min<uint64_t>(chunk_symbols, entries - j * chunk_symbols);
    const uint64_t lo = n * stream->min_len, hi = n * stream->max_len;  // n <= 2^32, len <= 16
    if (bits < lo || bits > hi)
      return Fail(error, name + ": chunk_bits[" + std::to_string(j) + "] = " + std::to_string(bits) +
                             " is out of range for " + std::to_string(n) + " symbols of " +
                             std::to_string(stream->min_len) + ".." + std::to_string(stream->max_len) + " bits");
    stream->chunk_bits[j] = bits;
    stream->chunk_start[j] = total;
    total += bits;
  }
  stream->total_bits = total;
  return true;
}

void BuildHuffmanTable(Stream* stream) {
  unsigned count[kMaxHuffmanLength + 1] = {};
  for (uint8_t len : stream->lengths) count[len]++;
  count[0] = 0;
  uint32_t next[kMaxHuffmanLength + 2] = {};
  uint32_t code = 0;
  for (unsigned len = 1; len <= kMaxHuffmanLength; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = code;
  }
  const unsigned max_len = stream->max_len;
  stream->table.assign(size_t{1} << max_len, 0);
  for (size_t s = 0; s < stream->lengths.size(); ++s) {
    const unsigned len = stream->lengths[s];
    if (len == 0) continue;
    const uint32_t c = next[len]++;
    // Kraft <= 1 keeps every canonical code word below 2^len, so the range
    // below lies inside the table and ranges of different symbols never overlap.
    const size_t first = size_t{c} << (max_len - len);
    const size_t last = size_t{c + 1} << (max_len - len);
    const uint32_t value = static_cast<uint32_t>(s) | (uint32_t{len} << 16);
    std::fill(stream->table.begin() + first, stream->table.begin() + last, value);
  }
}

// The next `n` (1..16) bits of the payload at bit `pos`, most significant bit
// first; bits past the end of the payload read as 0.
inline uint32_t PeekBits(const uint8_t* payload, size_t size, uint64_t pos, unsigned n) {
  const uint64_t byte = pos >> 3;
  uint64_t window;
  if (byte + 8 <= size) {
    std::memcpy(&window, payload + byte, 8);
    window = __builtin_bswap64(window);
  } else {
    window = 0;
    for (unsigned i = 0; i < 8; ++i) {
      window <<= 8;
      if (byte + i < size) window |= payload[byte + i];
    }
  }
  window <<= (pos & 7);
  return static_cast<uint32_t>(window >> (64 - n));
}

// How decoding one chunk went. Errors are reported in the reference
// decoder's order: within a stream, a bit pattern that is no code word (or a
// raw symbol out of range) in any chunk before a chunk whose length disagrees
// with chunk_bits; the code stream before the gap stream.
enum class ChunkResult { kOk, kBadSymbol, kLengthMismatch };

// Decodes chunk j of `stream` (n symbols) into out[0 .. n). A chunk whose
// symbols run past its recorded length is still decoded to its n symbols
// (reads past the payload see zero bits), so a bad symbol later in it is
// found; *used_bits receives the bits it took.
ChunkResult DecodeChunk(const Stream& stream, uint64_t j, uint64_t n, uint16_t* out, uint64_t* used_bits) {
  const uint64_t start = stream.chunk_start[j];
  uint64_t pos = start;
  const uint8_t* payload = stream.payload;
  const size_t size = stream.payload_size;
  if (stream.huffman) {
    const unsigned max_len = stream.max_len;
    const uint32_t* table = stream.table.data();
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t entry = table[PeekBits(payload, size, pos, max_len)];
      const unsigned len = entry >> 16;
      if (len == 0) {
        *used_bits = i;  // index of the bad symbol
        return ChunkResult::kBadSymbol;
      }
      pos += len;
      out[i] = static_cast<uint16_t>(entry & 0xFFFF);
    }
  } else {
    const unsigned width = stream.raw_width;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t symbol = PeekBits(payload, size, pos, width);
      if (symbol >= stream.alphabet) {
        *used_bits = i;
        return ChunkResult::kBadSymbol;
      }
      out[i] = static_cast<uint16_t>(symbol);
      pos += width;
    }
  }
  *used_bits = pos - start;
  return pos - start == stream.chunk_bits[j] ? ChunkResult::kOk : ChunkResult::kLengthMismatch;
}

// The first failures found in a range of chunks.
struct RangeResult {
  uint64_t bad_symbol_chunk = UINT64_MAX;
  uint64_t bad_symbol_index = 0;
  uint64_t mismatch_chunk = UINT64_MAX;
  uint64_t mismatch_bits = 0;
};

void DecodeChunkRange(const Stream* stream, uint16_t* out, uint64_t entries, uint32_t chunk_symbols,
                      uint64_t first, uint64_t last, RangeResult* result) {
  for (uint64_t j = first; j < last; ++j) {
    const uint64_t begin = j * chunk_symbols;
    const uint64_t n = std::min<uint64_t>(chunk_symbols, entries - begin);
    uint64_t used = 0;
    const ChunkResult r = DecodeChunk(*stream, j, n, out + begin, &used);
    if (r == ChunkResult::kBadSymbol) {
      result->bad_symbol_chunk = j;
      result->bad_symbol_index = begin + used;
      return;  // nothing in a later chunk can take precedence
    }
    if (r == ChunkResult::kLengthMismatch && result->mismatch_chunk == UINT64_MAX) {
      result->mismatch_chunk = j;
      result->mismatch_bits = used;
    }
  }
}

unsigned ChooseThreads(const DecodeOptions& options, uint64_t entries, uint64_t nchunks) {
  unsigned threads = options.threads;
  if (threads == 0) {
    threads = std::max(1u, std::min(std::thread::hardware_concurrency(), kMaxDecodeThreads));
    threads = static_cast<unsigned>(std::min<uint64_t>(threads, entries / kSymbolsPerThread + 1));
  }
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(threads, nchunks)));
}

// Decodes every chunk of one stream into out[0 .. entries), in parallel when
// the stream is large. The error reported does not depend on the thread count.
bool DecodeStream(const Stream& stream, uint16_t* out, uint64_t entries, uint32_t chunk_symbols,
                  const DecodeOptions& options, std::string* error) {
  const uint64_t nchunks = stream.chunk_bits.size();
  const unsigned threads = ChooseThreads(options, entries, nchunks);
  std::vector<RangeResult> results(threads);
  std::vector<std::thread> workers;
  auto first_chunk = [&](unsigned t) { return nchunks * t / threads; };
  unsigned started = 1;
  try {
    for (unsigned t = 1; t < threads; ++t) {
      workers.emplace_back(DecodeChunkRange, &stream, out, entries, chunk_symbols, first_chunk(t), first_chunk(t + 1),
                           &results[t]);
      ++started;
    }
  } catch (const std::exception&) {
    // No more threads available: the calling thread decodes what is left.
  }
  DecodeChunkRange(&stream, out, entries, chunk_symbols, first_chunk(0), first_chunk(1), &results[0]);
  for (unsigned t = started; t < threads; ++t)
    DecodeChunkRange(&stream, out, entries, chunk_symbols, first_chunk(t), first_chunk(t + 1), &results[t]);
  for (auto& worker : workers) worker.join();

  // Ranges are in chunk order: the first range with a failure holds the
  // stream's first failure of that kind.
  const std::string name = stream.name;
  for (const RangeResult& r : results) {
    if (r.bad_symbol_chunk == UINT64_MAX) continue;
    if (stream.huffman)
      return Fail(error, name + ": invalid code word in chunk " + std::to_string(r.bad_symbol_chunk) +
                             ": the bits match no Huffman code");
    // Raw chunks are exactly n_j * width bits long, so entry e starts at bit e * width.
    const uint64_t entry = r.bad_symbol_index;
    const uint32_t value = PeekBits(stream.payload, stream.payload_size, entry * stream.raw_width, stream.raw_width);
    return Fail(error, name + ": symbol " + std::to_string(value) + " at entry " + std::to_string(entry) +
                           " is out of range (alphabet size " + std::to_string(stream.alphabet) + ")");
  }
  for (const RangeResult& r : results) {
    if (r.mismatch_chunk == UINT64_MAX) continue;
    return Fail(error, name + ": chunk " + std::to_string(r.mismatch_chunk) + " decodes in " +
                           std::to_string(r.mismatch_bits) + " bits but its chunk_bits says " +
                           std::to_string(stream.chunk_bits[r.mismatch_chunk]));
  }
  return true;
}

// Parses everything up to the payloads. `streams` receives the code stream
// and, for the sparse layout, the gap stream.
bool ParseContainer(const uint8_t* data, size_t size, const DecodeOptions& options, ContainerInfo* info,
                    std::vector<uint8_t>* codebook, Stream* code_stream, Stream* gap_stream,
                    std::string* error) {
  if (data == nullptr && size != 0) return Fail(error, "no container data");
  static const uint8_t kMagic[4] = {'O', 'D', 'C', 'T'};
  if (size < kHeaderBytes + kCrcBytes)
    return Fail(error, "truncated container: " + std::to_string(size) + " bytes, a container has at least " +
                           std::to_string(kHeaderBytes + kCrcBytes));
  if (std::memcmp(data, kMagic, 4) != 0) return Fail(error, "bad magic: not an onnx-dc container (expected ODCT)");
  if (data[4] != 1) return Fail(error, "unsupported version " + std::to_string(data[4]) + " (this decoder reads version 1)");
  const uint32_t stored_crc = LoadU32(data + size - kCrcBytes);
  const uint32_t computed_crc = Crc32(data, size - kCrcBytes);
  if (stored_crc != computed_crc)
    return Fail(error, "checksum mismatch (CRC-32 stored " + Hex32(stored_crc) + ", computed " +
                           Hex32(computed_crc) + "): the container is corrupted or truncated");
  const size_t body_size = size - kCrcBytes;
  ByteReader reader(data, body_size);
  const uint8_t* h = reader.Take(kHeaderBytes);

  const unsigned dtype = h[5];
  if (dtype != 1 && dtype != 10 && dtype != 11 && dtype != 16)
    return Fail(error, "unsupported dtype " + std::to_string(dtype) + " (1 float32, 10 float16, 11 float64, 16 bfloat16)");
  info->dtype = static_cast<DType>(dtype);
  const unsigned layout = h[6];
  if (layout > 1) return Fail(error, "unknown layout " + std::to_string(layout) + " (0 dense, 1 sparse)");
  info->layout = static_cast<Layout>(layout);
  info->bits = h[7];
  if (info->bits < 1 || info->bits > 8) return Fail(error, "weight bits " + std::to_string(info->bits) + " is outside 1..8");
  info->index_bits = h[8];
  if (info->layout == Layout::kSparse && (info->index_bits < 1 || info->index_bits > 16))
    return Fail(error, "index bits " + std::to_string(info->index_bits) + " is outside 1..16 (sparse layout)");
  if (info->layout == Layout::kDense && info->index_bits != 0)
    return Fail(error, "index bits must be 0 in the dense layout, got " + std::to_string(info->index_bits));
  const unsigned ndim = h[9];
  if (ndim > kMaxNdim) return Fail(error, "ndim " + std::to_string(ndim) + " is outside 0..8");
  info->codebook_size = LoadU16(h + 10);
  if (info->codebook_size > (1u << info->bits))
    return Fail(error, "codebook size " + std::to_string(info->codebook_size) + " exceeds 2^bits = " +
                           std::to_string(1u << info->bits));
  info->chunk_symbols = LoadU32(h + 12);
  if (info->chunk_symbols < 1) return Fail(error, "chunk size (chunk_symbols) is 0, must be at least 1");
  info->entries = LoadU64(h + 16);

  const uint8_t* dims = reader.Take(uint64_t{8} * ndim);
  if (!dims) return Fail(error, "truncated container: the dims field runs past the checksum");
  info->dims.resize(ndim);
  // The product of the nonzero dims times itemsize must fit in 63 bits
  // (onnxruntime shapes and byte sizes are int64), even when a zero dim makes
  // numel 0.
  constexpr uint64_t kInt64Max = uint64_t{INT64_MAX};
  const uint64_t itemsize = ItemSize(info->dtype);
  uint64_t nonzero_bytes = itemsize;
  bool overflow = false, has_zero = false;
  for (unsigned i = 0; i < ndim; ++i) {
    const uint64_t d = LoadU64(dims + 8 * i);
    info->dims[i] = d;
    if (d == 0) {
      has_zero = true;
      continue;
    }
    if (!overflow && nonzero_bytes > kInt64Max / d) overflow = true;
    if (!overflow) nonzero_bytes *= d;
  }
  if (overflow)
    return Fail(error, "shape overflow: the dims times the item size do not fit in 63 bits");
  const uint64_t numel = has_zero ? 0 : nonzero_bytes / itemsize;
  info->numel = numel;
  if (numel > options.max_elements)
    return Fail(error, "tensor of " + std::to_string(numel) + " elements exceeds the limit of " +
                           std::to_string(options.max_elements) + " elements");
  if (info->layout == Layout::kDense && info->entries != numel)
    return Fail(error, "entries " + std::to_string(info->entries) + " differ from the " + std::to_string(numel) +
                           " elements of a dense tensor");
  if (info->layout == Layout::kSparse && info->entries > numel)
    return Fail(error, "entries " + std::to_string(info->entries) + " exceed the " + std::to_string(numel) +
                           " elements of the tensor");

  const uint8_t* cb = reader.Take(uint64_t{info->codebook_size} * itemsize);
  if (!cb) return Fail(error, "truncated container: the codebook runs past the checksum");
  for (uint32_t i = 0; i < info->codebook_size; ++i) {
    if (!IsFiniteValue(info->dtype, cb + i * itemsize))
      return Fail(error, "codebook value " + std::to_string(i) + " is not finite (NaN or Inf)");
  }
  codebook->assign(cb, cb + size_t{info->codebook_size} * itemsize);

  code_stream->name = "code stream";
  code_stream->alphabet = info->codebook_size + 1;
  if (!ReadStreamDescriptor(&reader, code_stream, info->entries, info->chunk_symbols, error)) return false;
  const bool sparse = info->layout == Layout::kSparse;
  if (sparse) {
    gap_stream->name = "gap stream";
    gap_stream->alphabet = 1u << info->index_bits;
    if (!ReadStreamDescriptor(&reader, gap_stream, info->entries, info->chunk_symbols, error)) return false;
  }
  std::vector<Stream*> streams = {code_stream};
  if (sparse) streams.push_back(gap_stream);
  for (Stream* stream : streams) {
    const uint64_t payload_bytes = stream->total_bits / 8 + (stream->total_bits % 8 != 0);
    const size_t at = reader.offset();
    const uint8_t* payload = reader.Take(payload_bytes);
    if (!payload)
      return Fail(error, std::string("truncated container: the ") + stream->name + " payload of " +
                             std::to_string(payload_bytes) + " bytes at byte " + std::to_string(at) +
                             " runs past the checksum at byte " + std::to_string(body_size));
    stream->payload = payload;
    stream->payload_size = static_cast<size_t>(payload_bytes);
    const unsigned used = stream->total_bits % 8;
    if (used != 0 && (payload[payload_bytes - 1] & ((1u << (8 - used)) - 1)) != 0)
      return Fail(error, std::string(stream->name) + ": padding bits after the last chunk are not zero");
  }
  if (reader.remaining() != 0)
    return Fail(error, "trailing bytes: " + std::to_string(reader.remaining()) +
                           " bytes between the last payload and the checksum");
  return true;
}

}  // namespace

size_t ItemSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

uint32_t Crc32(const uint8_t* data, size_t size) {
  const auto& t = kCrcTables.t;
  uint32_t crc = 0xFFFFFFFFu;
  while (size >= 8) {
    const uint32_t lo = LoadU32(data) ^ crc;
    const uint32_t hi = LoadU32(data + 4);
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    data += 8;
    size -= 8;
  }
  while (size--) crc = (crc >> 8) ^ t[0][(crc ^ *data++) & 0xFF];
  return crc ^ 0xFFFFFFFFu;
}

bool ReadContainerInfo(const uint8_t* data, size_t size, const DecodeOptions& options, ContainerInfo* info,
                       std::string* error) {
  std::vector<uint8_t> codebook;
  Stream code_stream, gap_stream;
  return ParseContainer(data, size, options, info, &codebook, &code_stream, &gap_stream, error);
}

bool DecodeContainer(const uint8_t* data, size_t size, const DecodeOptions& options, DecodedContainer* out,
                     std::string* error) {
  Stream code_stream, gap_stream;
  if (!ParseContainer(data, size, options, &out->info, &out->codebook, &code_stream, &gap_stream, error))
    return false;
  const ContainerInfo& info = out->info;
  const bool sparse = info.layout == Layout::kSparse;
  if (code_stream.huffman) BuildHuffmanTable(&code_stream);
  if (sparse && gap_stream.huffman) BuildHuffmanTable(&gap_stream);
  // entries <= 8 * container size (checked above): these allocations are
  // bounded by the input size.
  out->codes.assign(static_cast<size_t>(info.entries), 0);
  out->gaps.assign(sparse ? static_cast<size_t>(info.entries) : 0, 0);
  if (info.entries > 0) {
    if (!DecodeStream(code_stream, out->codes.data(), info.entries, info.chunk_symbols, options, error)) return false;
    if (sparse && !DecodeStream(gap_stream, out->gaps.data(), info.entries, info.chunk_symbols, options, error))
      return false;
  }
  if (sparse) {
    // Positions p[i] = p[i-1] + gap + 1 must stay below numel (section 4.3).
    uint64_t next = 0;  // p[i-1] + 1
    for (uint64_t i = 0; i < info.entries; ++i) {
      const uint64_t position = next + out->gaps[i];
      if (position >= info.numel)
        return Fail(error, "gap stream: entry position " + std::to_string(position) + " (entry " + std::to_string(i) +
                               ") is past the end of the tensor (" + std::to_string(info.numel) + " elements)");
      next = position + 1;
    }
  }
  return true;
}

struct ChunkedContainer::Impl {
  ContainerInfo info;
  std::vector<uint8_t> codebook;
  Stream code_stream;
  Stream gap_stream;
  std::vector<uint64_t> chunk_next;  // sparse: p[-1] + 1 before each chunk's first entry
};

ChunkedContainer::ChunkedContainer() = default;
ChunkedContainer::~ChunkedContainer() = default;
ChunkedContainer::ChunkedContainer(ChunkedContainer&&) noexcept = default;
ChunkedContainer& ChunkedContainer::operator=(ChunkedContainer&&) noexcept = default;

bool ChunkedContainer::Open(const uint8_t* data, size_t size, const DecodedContainer& decoded, std::string* error) {
  auto impl = std::make_unique<Impl>();
  DecodeOptions options;
  options.max_elements = UINT64_MAX;  // decoded already passed the caller's limit
  if (!ParseContainer(data, size, options, &impl->info, &impl->codebook, &impl->code_stream, &impl->gap_stream, error))
    return false;
  const ContainerInfo& info = impl->info;
  if (info.entries != decoded.info.entries || decoded.codes.size() != info.entries)
    return Fail(error, "internal: the decoded container does not match its bytes");
  const bool sparse = info.layout == Layout::kSparse;
  if (impl->code_stream.huffman) BuildHuffmanTable(&impl->code_stream);
  if (sparse && impl->gap_stream.huffman) BuildHuffmanTable(&impl->gap_stream);
  if (sparse) {
    const uint64_t chunks = impl->code_stream.chunk_bits.size();
    impl->chunk_next.resize(chunks);
    uint64_t next = 0;
    for (uint64_t i = 0; i < info.entries; ++i) {
      if (i % info.chunk_symbols == 0) impl->chunk_next[i / info.chunk_symbols] = next;
      next += uint64_t{decoded.gaps[i]} + 1;
    }
  }
  impl_ = std::move(impl);
  return true;
}

const ContainerInfo& ChunkedContainer::info() const { return impl_->info; }

uint64_t ChunkedContainer::num_chunks() const { return impl_->code_stream.chunk_bits.size(); }

uint64_t ChunkedContainer::DecodeChunk(uint64_t j, uint16_t* codes, uint64_t* positions, uint16_t* gaps) const {
  const ContainerInfo& info = impl_->info;
  const uint64_t first = j * info.chunk_symbols;
  const uint64_t n = std::min<uint64_t>(info.chunk_symbols, info.entries - first);
  uint64_t used = 0;
  ::onnx_dc::DecodeChunk(impl_->code_stream, j, n, codes, &used);  // validated by Open's caller
  if (info.layout == Layout::kSparse) {
    ::onnx_dc::DecodeChunk(impl_->gap_stream, j, n, gaps, &used);
    uint64_t next = impl_->chunk_next[j];
    for (uint64_t i = 0; i < n; ++i) {
      positions[i] = next + gaps[i];
      next = positions[i] + 1;
    }
  } else {
    for (uint64_t i = 0; i < n; ++i) positions[i] = first + i;
  }
  return n;
}

size_t ChunkedContainer::memory_bytes() const {
  if (!impl_) return 0;
  const Impl& m = *impl_;
  size_t bytes = sizeof(Impl) + m.codebook.size() + 8 * m.chunk_next.size();
  for (const Stream* stream : {&m.code_stream, &m.gap_stream})
    bytes += stream->lengths.size() + 4 * stream->chunk_bits.size() + 8 * stream->chunk_start.size() +
             4 * stream->table.size();
  return bytes;
}

void ExpandToDense(const DecodedContainer& decoded, void* out) {
  const ContainerInfo& info = decoded.info;
  if (info.numel == 0) return;  // `out` may be null for an empty tensor
  const size_t itemsize = ItemSize(info.dtype);
  uint8_t* dst = static_cast<uint8_t*>(out);
  const uint8_t* codebook = decoded.codebook.data();
  const uint32_t zero_symbol = info.codebook_size;
  if (info.layout == Layout::kDense) {
    for (uint64_t i = 0; i < info.entries; ++i) {
      const uint16_t c = decoded.codes[i];
      if (c == zero_symbol) {
        std::memset(dst + i * itemsize, 0, itemsize);
      } else {
        std::memcpy(dst + i * itemsize, codebook + size_t{c} * itemsize, itemsize);
      }
    }
    return;
  }
  std::memset(dst, 0, static_cast<size_t>(info.numel) * itemsize);
  uint64_t position = 0;
  for (uint64_t i = 0; i < info.entries; ++i) {
    position += decoded.gaps[i];
    const uint16_t c = decoded.codes[i];
    if (c != zero_symbol) std::memcpy(dst + position * itemsize, codebook + size_t{c} * itemsize, itemsize);
    ++position;
  }
}

}  // namespace onnx_dc
