// Creates and destroys onnxruntime sessions with the onnx-dc operator library
// under LeakSanitizer. Built by `fuzz/build.sh leak` with -fsanitize=address
// (LeakSanitizer is part of it), together with an ASan build of the library
// (fuzz/build/libonnx_dc_ops_lsan.so); run by tests/test_runtime_stress.py.
//
//   session_leak_driver ORT_LIBRARY OPS_LIBRARY SESSIONS RUNS MODEL... [--leak-on-purpose]
//
// onnxruntime is loaded with dlopen from the Python wheel
// (onnxruntime/capi/libonnxruntime.so.*): no Python in the process, so any
// leak LeakSanitizer reports at exit is the library's or onnxruntime's. Each of
// SESSIONS rounds creates one session per MODEL, runs it RUNS times on
// deterministic inputs (dynamic dimensions set to 2) and releases everything.
// A model whose session creation fails (a corrupted container) is expected to
// fail every time: the error path is checked for leaks too. Prints one summary
// line; exit 0, or 1 on an unexpected error. `--leak-on-purpose` leaks one
// block at the end (the test's proof that leaks are detected).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

const OrtApi* g_api = nullptr;

// Returns false (after printing the message) when `status` is an error.
bool Ok(OrtStatus* status, const char* what, std::string* message = nullptr) {
  if (status == nullptr) return true;
  if (message != nullptr) {
    *message = g_api->GetErrorMessage(status);
  } else {
    std::fprintf(stderr, "session_leak_driver: %s: %s\n", what, g_api->GetErrorMessage(status));
  }
  g_api->ReleaseStatus(status);
  return false;
}

struct Input {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
};

bool DescribeInputs(OrtSession* session, OrtAllocator* allocator, std::vector<Input>* inputs) {
  size_t count = 0;
  if (!Ok(g_api->SessionGetInputCount(session, &count), "SessionGetInputCount")) return false;
  for (size_t i = 0; i < count; ++i) {
    Input input;
    char* name = nullptr;
    if (!Ok(g_api->SessionGetInputName(session, i, allocator, &name), "SessionGetInputName")) return false;
    input.name = name;
    allocator->Free(allocator, name);
    OrtTypeInfo* type_info = nullptr;
    if (!Ok(g_api->SessionGetInputTypeInfo(session, i, &type_info), "SessionGetInputTypeInfo")) return false;
    const OrtTensorTypeAndShapeInfo* tensor_info = nullptr;
    bool ok = Ok(g_api->CastTypeInfoToTensorInfo(type_info, &tensor_info), "CastTypeInfoToTensorInfo") &&
              Ok(g_api->GetTensorElementType(tensor_info, &input.type), "GetTensorElementType");
    size_t rank = 0;
    ok = ok && Ok(g_api->GetDimensionsCount(tensor_info, &rank), "GetDimensionsCount");
    input.shape.resize(rank);
    ok = ok && Ok(g_api->GetDimensions(tensor_info, input.shape.data(), rank), "GetDimensions");
    g_api->ReleaseTypeInfo(type_info);
    if (!ok) return false;
    for (int64_t& d : input.shape)
      if (d < 0) d = 2;
    inputs->push_back(input);
  }
  return true;
}

// Runs `session` once on deterministic inputs; releases every value it creates.
bool RunOnce(OrtSession* session, const std::vector<Input>& inputs, OrtAllocator* allocator) {
  OrtMemoryInfo* memory = nullptr;
  if (!Ok(g_api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory), "CreateCpuMemoryInfo"))
    return false;
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<OrtValue*> values;
  std::vector<const char*> names;
  bool ok = true;
  for (const Input& input : inputs) {
    size_t numel = 1;
    for (int64_t d : input.shape) numel *= static_cast<size_t>(d);
    size_t itemsize = input.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4;
    std::vector<uint8_t> buffer(numel * itemsize);
    if (input.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      float* f = reinterpret_cast<float*>(buffer.data());
      for (size_t i = 0; i < numel; ++i) f[i] = (i % 7 == 0) ? 0.0f : static_cast<float>(i % 13) / 13.0f - 0.4f;
    } else if (input.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      int64_t* v = reinterpret_cast<int64_t*>(buffer.data());
      for (size_t i = 0; i < numel; ++i) v[i] = static_cast<int64_t>(i % 5);
    } else {
      std::fprintf(stderr, "session_leak_driver: input %s has an unsupported element type %d\n", input.name.c_str(),
                   static_cast<int>(input.type));
      ok = false;
      break;
    }
    OrtValue* value = nullptr;
    ok = Ok(g_api->CreateTensorWithDataAsOrtValue(memory, buffer.data(), buffer.size(), input.shape.data(),
                                                  input.shape.size(), input.type, &value),
            "CreateTensorWithDataAsOrtValue");
    if (!ok) break;
    buffers.push_back(std::move(buffer));
    values.push_back(value);
    names.push_back(input.name.c_str());
  }
  size_t output_count = 0;
  std::vector<std::string> output_names;
  std::vector<const char*> output_name_ptrs;
  if (ok) ok = Ok(g_api->SessionGetOutputCount(session, &output_count), "SessionGetOutputCount");
  for (size_t i = 0; ok && i < output_count; ++i) {
    char* name = nullptr;
    ok = Ok(g_api->SessionGetOutputName(session, i, allocator, &name), "SessionGetOutputName");
    if (ok) {
      output_names.emplace_back(name);
      allocator->Free(allocator, name);
    }
  }
  for (const std::string& name : output_names) output_name_ptrs.push_back(name.c_str());
  std::vector<OrtValue*> outputs(output_count, nullptr);
  if (ok)
    ok = Ok(g_api->Run(session, nullptr, names.data(), values.data(), values.size(), output_name_ptrs.data(),
                       output_count, outputs.data()),
            "Run");
  for (OrtValue* output : outputs)
    if (output) g_api->ReleaseValue(output);
  for (OrtValue* value : values) g_api->ReleaseValue(value);
  g_api->ReleaseMemoryInfo(memory);
  return ok;
}

}  // namespace

void* volatile g_leaked_on_purpose = nullptr;

int main(int argc, char** argv) {
  bool leak_on_purpose = false;
  std::vector<const char*> args;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--leak-on-purpose") == 0) {
      leak_on_purpose = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  if (args.size() < 5) {
    std::fprintf(stderr, "usage: %s ORT_LIBRARY OPS_LIBRARY SESSIONS RUNS MODEL... [--leak-on-purpose]\n", argv[0]);
    return 2;
  }
  const char* ops_library = args[1];
  const long sessions = std::strtol(args[2], nullptr, 10);
  const long runs = std::strtol(args[3], nullptr, 10);
  const std::vector<const char*> models(args.begin() + 4, args.end());

  void* ort = dlopen(args[0], RTLD_NOW | RTLD_LOCAL);
  if (ort == nullptr) {
    std::fprintf(stderr, "session_leak_driver: cannot load %s: %s\n", args[0], dlerror());
    return 2;
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(dlsym(ort, "OrtGetApiBase"));
  if (get_api_base == nullptr || (g_api = get_api_base()->GetApi(ORT_API_VERSION)) == nullptr) {
    std::fprintf(stderr, "session_leak_driver: %s does not provide ORT API %d\n", args[0], ORT_API_VERSION);
    return 2;
  }
  OrtEnv* env = nullptr;
  if (!Ok(g_api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "leak-driver", &env), "CreateEnv")) return 1;
  OrtAllocator* allocator = nullptr;
  if (!Ok(g_api->GetAllocatorWithDefaultOptions(&allocator), "GetAllocatorWithDefaultOptions")) return 1;

  std::vector<int> refused(models.size(), 0);
  long created = 0, total_runs = 0;
  std::string first_error;
  bool ok = true;
  for (long round = 0; ok && round < sessions; ++round) {
    for (size_t m = 0; ok && m < models.size(); ++m) {
      OrtSessionOptions* options = nullptr;
      ok = Ok(g_api->CreateSessionOptions(&options), "CreateSessionOptions") &&
           Ok(g_api->SetIntraOpNumThreads(options, 1 + static_cast<int>(round % 2)), "SetIntraOpNumThreads") &&
           Ok(g_api->RegisterCustomOpsLibrary_V2(options, ops_library), "RegisterCustomOpsLibrary_V2");
      OrtSession* session = nullptr;
      std::string message;
      if (ok && !Ok(g_api->CreateSession(env, models[m], options, &session), "CreateSession", &message)) {
        ++refused[m];  // a corrupted model: its session must fail every time
        if (first_error.empty()) first_error = message;
      } else if (ok) {
        ++created;
        std::vector<Input> inputs;
        ok = DescribeInputs(session, allocator, &inputs);
        for (long r = 0; ok && r < runs; ++r, ++total_runs) ok = RunOnce(session, inputs, allocator);
      }
      if (session) g_api->ReleaseSession(session);
      if (options) g_api->ReleaseSessionOptions(options);
    }
  }
  for (size_t m = 0; m < models.size(); ++m) {
    if (refused[m] != 0 && refused[m] != sessions) {
      std::fprintf(stderr, "session_leak_driver: %s failed %d of %ld times\n", models[m], refused[m], sessions);
      ok = false;
    }
  }
  g_api->ReleaseEnv(env);
  int refused_models = 0;
  for (int r : refused) refused_models += r != 0;
  std::printf("session_leak_driver: %ld sessions created, %ld runs, %d of %zu models refused%s%s\n", created,
              total_runs, refused_models, models.size(), first_error.empty() ? "" : ": ", first_error.c_str());
  if (leak_on_purpose) {
    // Through a volatile global so the compiler cannot drop the allocation.
    g_leaked_on_purpose = std::malloc(4321);
    g_leaked_on_purpose = nullptr;
  }
  return ok ? 0 : 1;
}
