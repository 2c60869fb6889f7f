// The compact in-memory form of a decoded container (compact.h).
#include "compact.h"

#include <algorithm>
#include <cstring>

#include "gemm.h"

namespace onnx_dc {

namespace {

// Calls visit(position, code) for every kept element, positions ascending.
template <typename Visit>
void ForEachKept(const DecodedContainer& decoded, Visit visit) {
  const ContainerInfo& info = decoded.info;
  const uint32_t zero_symbol = info.codebook_size;
  uint64_t position = 0;
  const bool sparse = info.layout == Layout::kSparse;
  for (uint64_t i = 0; i < info.entries; ++i) {
    if (sparse) position += decoded.gaps[i];
    const uint16_t code = decoded.codes[i];
    if (code != zero_symbol) visit(position, static_cast<uint8_t>(code));
    ++position;
  }
}

template <typename T>
void ExpandCodes(const uint8_t* codes, uint64_t count, const uint8_t* table, uint8_t* out) {
  T lut[256];
  std::memcpy(lut, table, sizeof(lut));
  T* dst = reinterpret_cast<T*>(out);
  for (uint64_t i = 0; i < count; ++i) dst[i] = lut[codes[i]];
}

template <typename T, typename Position>
void ExpandSparse(const CompactTensor& t, const Position* positions, uint64_t first_row, uint64_t count,
                  uint8_t* out) {
  T lut[256];
  std::memcpy(lut, t.table.data(), sizeof(lut));
  std::memset(out, 0, static_cast<size_t>(count * t.row_size) * sizeof(T));
  for (uint64_t r = 0; r < count; ++r) {
    T* row = reinterpret_cast<T*>(out) + r * t.row_size;
    const uint64_t begin = t.row_offsets[first_row + r], end = t.row_offsets[first_row + r + 1];
    for (uint64_t i = begin; i < end; ++i) row[positions[i]] = lut[t.codes[i]];
  }
}

template <typename T>
void ExpandSparseTyped(const CompactTensor& t, uint64_t first_row, uint64_t count, uint8_t* out) {
  if (!t.positions16.empty() || t.positions32.empty()) {
    ExpandSparse<T>(t, t.positions16.data(), first_row, count, out);
  } else {
    ExpandSparse<T>(t, t.positions32.data(), first_row, count, out);
  }
}

}  // namespace

size_t CompactTensor::memory_bytes() const {
  return sizeof(*this) + dims.capacity() * sizeof(uint64_t) + table.capacity() + codes.capacity() +
         row_offsets.capacity() * sizeof(uint64_t) + positions16.capacity() * sizeof(uint16_t) +
         positions32.capacity() * sizeof(uint32_t) + dense.capacity();
}

void BuildCompactTensor(const DecodedContainer& decoded, bool prefer_codes, CompactTensor* out) {
  const ContainerInfo& info = decoded.info;
  CompactTensor& t = *out;
  t.dtype = info.dtype;
  t.dims = info.dims;
  t.numel = info.numel;
  t.itemsize = ItemSize(info.dtype);
  t.rows = info.dims.empty() ? 1 : info.dims[0];
  t.row_size = t.rows == 0 ? 0 : info.numel / t.rows;
  const uint32_t zero_symbol = info.codebook_size;
  t.table.assign(256 * t.itemsize, 0);
  if (info.codebook_size > 0)
    std::memcpy(t.table.data(), decoded.codebook.data(), size_t{info.codebook_size} * t.itemsize);

  uint64_t kept = 0;
  ForEachKept(decoded, [&](uint64_t, uint8_t) { ++kept; });
  bool zero_index = zero_symbol < 256 || kept == info.numel;
  t.zero_code = static_cast<uint8_t>(zero_symbol < 256 ? zero_symbol : 0);
  if (zero_symbol >= 256) {
    for (uint32_t i = 0; i < 256 && !zero_index; ++i) {
      const uint8_t* v = t.table.data() + i * t.itemsize;
      if (std::all_of(v, v + t.itemsize, [](uint8_t b) { return b == 0; })) {
        zero_index = true;
        t.zero_code = static_cast<uint8_t>(i);
      }
    }
  }
  const bool short_rows = t.row_size <= 65536;
  const bool sparse_possible = t.row_size <= UINT32_MAX && t.rows > 0;
  const uint64_t sparse_bytes = kept * (short_rows ? 3 : 5) + 8 * (t.rows + 1);
  const bool sparse = sparse_possible && (!zero_index || (!prefer_codes && sparse_bytes < info.numel));
  if (sparse) {
    t.form = CompactForm::kSparseRows;
    t.row_offsets.assign(static_cast<size_t>(t.rows + 1), 0);
    t.codes.resize(static_cast<size_t>(kept));
    if (short_rows) {
      t.positions16.resize(static_cast<size_t>(kept));
    } else {
      t.positions32.resize(static_cast<size_t>(kept));
    }
    uint64_t i = 0;
    ForEachKept(decoded, [&](uint64_t position, uint8_t code) {
      const uint64_t row = position / t.row_size, column = position % t.row_size;
      t.row_offsets[row + 1] = i + 1;
      if (short_rows) {
        t.positions16[i] = static_cast<uint16_t>(column);
      } else {
        t.positions32[i] = static_cast<uint32_t>(column);
      }
      t.codes[i++] = code;
    });
    for (uint64_t r = 0; r < t.rows; ++r) t.row_offsets[r + 1] = std::max(t.row_offsets[r + 1], t.row_offsets[r]);
  } else if (zero_index) {
    t.form = CompactForm::kCodes;
    t.codes.assign(static_cast<size_t>(info.numel), t.zero_code);
    uint32_t limit = kept < info.numel ? uint32_t{t.zero_code} + 1 : 1;
    ForEachKept(decoded, [&](uint64_t position, uint8_t code) {
      t.codes[position] = code;
      limit = std::max<uint32_t>(limit, uint32_t{code} + 1);
    });
    t.code_limit = limit;
    t.avx512 = t.itemsize == 4 && DetectGemmIsa() >= GemmIsa::kAvx512;
  } else {
    t.form = CompactForm::kDenseBytes;
    t.dense.resize(static_cast<size_t>(info.numel) * t.itemsize);
    ExpandToDense(decoded, t.dense.data());
  }
}

void ExpandRows(const CompactTensor& t, uint64_t first_row, uint64_t count, void* out) {
  const uint64_t elements = count * t.row_size;
  if (elements == 0) return;
  uint8_t* dst = static_cast<uint8_t*>(out);
  switch (t.form) {
    case CompactForm::kDenseBytes:
      std::memcpy(dst, t.dense.data() + first_row * t.row_size * t.itemsize, static_cast<size_t>(elements) * t.itemsize);
      return;
    case CompactForm::kCodes: {
      const uint8_t* codes = t.codes.data() + first_row * t.row_size;
      if (t.itemsize == 2) {
        ExpandCodes<uint16_t>(codes, elements, t.table.data(), dst);
      } else if (t.itemsize == 4 && t.avx512) {
        uint32_t table[256];
        std::memcpy(table, t.table.data(), sizeof(table));
        avx512::ExpandCodes32(codes, elements, table, t.code_limit, reinterpret_cast<uint32_t*>(dst));
      } else if (t.itemsize == 4) {
        ExpandCodes<uint32_t>(codes, elements, t.table.data(), dst);
      } else {
        ExpandCodes<uint64_t>(codes, elements, t.table.data(), dst);
      }
      return;
    }
    case CompactForm::kSparseRows:
      if (t.itemsize == 2) {
        ExpandSparseTyped<uint16_t>(t, first_row, count, dst);
      } else if (t.itemsize == 4) {
        ExpandSparseTyped<uint32_t>(t, first_row, count, dst);
      } else {
        ExpandSparseTyped<uint64_t>(t, first_row, count, dst);
      }
      return;
  }
}

}  // namespace onnx_dc
