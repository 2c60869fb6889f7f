// onnx_dc_decode: decodes one container file with the C++ decoder.
//
//   onnx_dc_decode CONTAINER OUTPUT [THREADS]
//
// On success writes the dense tensor's bytes (row-major, little-endian) to
// OUTPUT, prints the header as one JSON line on stdout and exits 0. On a bad
// container prints "error: <message>" on stderr and exits 1; usage or I/O
// problems exit 2. THREADS (default 0: automatic) is the number of decoding
// threads. Used by the tests to compare the C++ and numpy decoders.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "container.h"

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: %s CONTAINER OUTPUT [THREADS]\n", argv[0]);
    return 2;
  }
  onnx_dc::DecodeOptions options;
  if (argc == 4) options.threads = static_cast<unsigned>(std::strtoul(argv[3], nullptr, 10));
  std::ifstream in(argv[1], std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 2;
  }
  const std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  onnx_dc::DecodedContainer decoded;
  std::string error;
  if (!onnx_dc::DecodeContainer(data.data(), data.size(), options, &decoded, &error)) {
    std::fprintf(stderr, "error: %s\n", error.c_str());
    return 1;
  }
  const onnx_dc::ContainerInfo& info = decoded.info;
  std::vector<uint8_t> dense(static_cast<size_t>(info.numel) * onnx_dc::ItemSize(info.dtype));
  onnx_dc::ExpandToDense(decoded, dense.data());
  std::ofstream out(argv[2], std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(dense.data()), static_cast<std::streamsize>(dense.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", argv[2]);
    return 2;
  }
  std::string shape;
  for (size_t i = 0; i < info.dims.size(); ++i) shape += (i ? ", " : "") + std::to_string(info.dims[i]);
  std::printf(
      "{\"dtype\": %u, \"shape\": [%s], \"layout\": \"%s\", \"bits\": %u, \"index_bits\": %u, "
      "\"codebook_size\": %u, \"chunk_symbols\": %u, \"entries\": %llu}\n",
      static_cast<unsigned>(info.dtype), shape.c_str(), info.layout == onnx_dc::Layout::kSparse ? "sparse" : "dense",
      info.bits, info.index_bits, info.codebook_size, info.chunk_symbols,
      static_cast<unsigned long long>(info.entries));
  return 0;
}
