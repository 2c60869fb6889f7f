// A C entry point to the C++ container decoder (runtime/src/container.cc) for
// Python's ctypes: the fuzz regression tests, the differential numpy fuzzer
// and the step-count test load it from fuzz/build/ (built by fuzz/build.sh).
//
//   odc_result* r = odc_decode(data, size, max_elements, threads);
//   odc_ok(r) ? odc_dense_bytes(r) / odc_expand(r, out) : odc_error(r);
//   odc_free(r);
//
// The counting build (libodc_count.so) compiles container.cc with
// -fsanitize-coverage=trace-pc-guard: every control-flow edge the decoder
// executes calls __sanitizer_cov_trace_pc_guard below, so odc_steps() is a
// deterministic measure of decoding work (used to show it grows linearly with
// the input, without timing anything).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>

#include "container.h"

#define ODC_EXPORT extern "C" __attribute__((visibility("default")))

struct odc_result {
  bool ok = false;
  std::string error;
  onnx_dc::DecodedContainer decoded;
};

ODC_EXPORT odc_result* odc_decode(const uint8_t* data, size_t size, uint64_t max_elements, unsigned threads) {
  odc_result* result = new (std::nothrow) odc_result;
  if (result == nullptr) return nullptr;
  onnx_dc::DecodeOptions options;
  options.max_elements = max_elements;
  options.threads = threads;
  try {
    result->ok = onnx_dc::DecodeContainer(data, size, options, &result->decoded, &result->error);
  } catch (const std::bad_alloc&) {
    result->ok = false;
    result->error = "out of memory";
  }
  return result;
}

ODC_EXPORT int odc_ok(const odc_result* result) { return result->ok ? 1 : 0; }

ODC_EXPORT const char* odc_error(const odc_result* result) { return result->error.c_str(); }

// ONNX dtype number, ndim and dims (up to 8) of a decoded container.
ODC_EXPORT unsigned odc_dtype(const odc_result* result) { return static_cast<unsigned>(result->decoded.info.dtype); }
ODC_EXPORT unsigned odc_ndim(const odc_result* result) { return static_cast<unsigned>(result->decoded.info.dims.size()); }
ODC_EXPORT uint64_t odc_dim(const odc_result* result, unsigned i) { return result->decoded.info.dims.at(i); }

ODC_EXPORT uint64_t odc_dense_bytes(const odc_result* result) {
  const onnx_dc::ContainerInfo& info = result->decoded.info;
  return info.numel * onnx_dc::ItemSize(info.dtype);
}

// `out` must hold odc_dense_bytes(result) bytes.
ODC_EXPORT void odc_expand(const odc_result* result, void* out) { onnx_dc::ExpandToDense(result->decoded, out); }

ODC_EXPORT void odc_free(odc_result* result) { delete result; }

// ---------------------------------------------------------------- step counter
static std::atomic<uint64_t> g_steps{0};

ODC_EXPORT uint64_t odc_steps() { return g_steps.load(std::memory_order_relaxed); }
ODC_EXPORT void odc_reset_steps() { g_steps.store(0, std::memory_order_relaxed); }

#ifdef ODC_COUNT_STEPS
extern "C" void __sanitizer_cov_trace_pc_guard_init(uint32_t* start, uint32_t* stop) {
  for (uint32_t* guard = start; guard < stop; ++guard) *guard = 1;
}
extern "C" void __sanitizer_cov_trace_pc_guard(uint32_t* guard) {
  (void)guard;
  g_steps.fetch_add(1, std::memory_order_relaxed);
}
#endif
