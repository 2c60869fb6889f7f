// onnxruntime glue: the custom operators of domain "ai.onnx_dc" and the
// library entry point RegisterCustomOps. Only onnxruntime's C API is used; the
// API table comes from the OrtApiBase that onnxruntime passes in, so nothing
// from onnxruntime is linked. See docs/OPERATORS.md for the contract.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "compact.h"
#include "container.h"
#include "conv.h"
#include "gemm.h"
#include "onnxruntime_c_api.h"
#include "resident_matmul.h"
#include "sparse_matmul.h"

#define ONNX_DC_EXPORT __attribute__((visibility("default")))

namespace onnx_dc {
namespace {

// The API version this library is written against (onnxruntime 1.21). Newer
// onnxruntime releases serve older API versions, so asking for exactly this
// one lets the library load into every onnxruntime from 1.21 on, whatever
// headers it was compiled with.
constexpr uint32_t kOrtApiVersion = 21;
static_assert(ORT_API_VERSION >= kOrtApiVersion, "onnxruntime headers older than 1.21");

constexpr const char* kDomain = "ai.onnx_dc";

enum class OpKind { kMatMul, kDecompress, kConv, kGather };

struct OpDef {
  OrtCustomOp base;  // first member: onnxruntime hands &base back to the callbacks
  const char* name;
  OpKind kind;
  DType dtype;  // DCDecompress*: the output element type
};

const OpDef& DefOf(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

ONNXTensorElementDataType OnnxType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::kFloat16:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::kFloat64:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
    case DType::kBFloat16:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

const char* DecompressOpName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "DCDecompress";
    case DType::kFloat16:
      return "DCDecompressFloat16";
    case DType::kFloat64:
      return "DCDecompressDouble";
    case DType::kBFloat16:
      return "DCDecompressBFloat16";
  }
  return "";
}

// ------------------------------------------------------------ API helpers

// Takes ownership of an OrtStatus and returns its message ("" for success).
std::string TakeStatusMessage(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return std::string();
  std::string message = api->GetErrorMessage(status);
  api->ReleaseStatus(status);
  return message.empty() ? std::string("onnxruntime call failed") : message;
}

struct TensorInfoDeleter {
  const OrtApi* api;
  void operator()(OrtTensorTypeAndShapeInfo* info) const { api->ReleaseTensorTypeAndShapeInfo(info); }
};
using TensorInfoPtr = std::unique_ptr<OrtTensorTypeAndShapeInfo, TensorInfoDeleter>;

// Shape of a tensor value; returns an error message or "".
std::string GetShape(const OrtApi* api, const OrtValue* value, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* raw = nullptr;
  std::string error = TakeStatusMessage(api, api->GetTensorTypeAndShape(value, &raw));
  if (!error.empty()) return error;
  TensorInfoPtr info(raw, TensorInfoDeleter{api});
  size_t count = 0;
  error = TakeStatusMessage(api, api->GetDimensionsCount(info.get(), &count));
  if (!error.empty()) return error;
  dims->assign(count, 0);
  return TakeStatusMessage(api, api->GetDimensions(info.get(), dims->data(), count));
}

// Element count of a shape, or false if a dimension is negative or it overflows.
bool ElementCount(const std::vector<int64_t>& dims, uint64_t* count) {
  uint64_t n = 1;
  for (int64_t d : dims) {
    if (d < 0) return false;
    const uint64_t u = static_cast<uint64_t>(d);
    if (u != 0 && n > UINT64_MAX / u) return false;
    n *= u;
  }
  for (int64_t d : dims) {
    if (d == 0) n = 0;
  }
  *count = n;
  return true;
}

std::string ShapeString(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Reads a name through one of onnxruntime's two-call string getters.
template <typename Getter>
std::string ReadName(const OrtApi* api, Getter getter) {
  size_t size = 0;
  if (!TakeStatusMessage(api, getter(nullptr, &size)).empty() || size == 0) return std::string();
  std::string name(size, '\0');
  if (!TakeStatusMessage(api, getter(&name[0], &size)).empty()) return std::string();
  name.resize(std::strlen(name.c_str()));
  return name;
}

// Bytes of a uint8 tensor (the container). Returns an error message or "".
std::string ContainerBytes(const OrtApi* api, const OrtValue* value, const uint8_t** data, size_t* size) {
  std::vector<int64_t> dims;
  std::string error = GetShape(api, value, &dims);
  if (!error.empty()) return error;
  uint64_t count = 0;
  if (!ElementCount(dims, &count)) return "invalid container tensor shape " + ShapeString(dims);
  void* raw = nullptr;
  error = TakeStatusMessage(api, api->GetTensorMutableData(const_cast<OrtValue*>(value), &raw));
  if (!error.empty()) return error;
  *data = static_cast<const uint8_t*>(raw);
  *size = static_cast<size_t>(count);
  return std::string();
}

// Describes a node's input for error messages.
struct InputLabel {
  std::string op;
  std::string node;
  std::string input;

  std::string Prefix() const {
    std::string s = op + (node.empty() ? std::string(" node (unnamed)") : " node '" + node + "'");
    if (!input.empty()) s += ", container '" + input + "'";
    return s + ": ";
  }
};

OrtStatus* MakeStatus(const OrtApi* api, OrtErrorCode code, const std::string& message) {
  return api->CreateStatus(code, message.c_str());
}

// Runs `body`, turning allocation failures and stray exceptions into statuses:
// nothing may unwind into onnxruntime.
template <typename Body>
OrtStatus* Guarded(const OrtApi* api, const std::string& prefix, Body body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return MakeStatus(api, ORT_FAIL, prefix + "out of memory");
  } catch (const std::exception& e) {
    return MakeStatus(api, ORT_FAIL, prefix + e.what());
  } catch (...) {
    return MakeStatus(api, ORT_FAIL, prefix + "unexpected error");
  }
}

// Reads the container input (index 1 for DCMatMul, 0 for DCDecompress) if it
// is a constant initializer. Returns an error message or "".
std::string ConstantInput(const OrtApi* api, const OrtKernelInfo* info, size_t index, bool* is_constant,
                          const uint8_t** data, size_t* size) {
  int constant = 0;
  const OrtValue* value = nullptr;
  std::string error = TakeStatusMessage(api, api->KernelInfoGetConstantInput_tensor(info, index, &constant, &value));
  if (!error.empty()) return error;
  *is_constant = constant != 0 && value != nullptr;
  if (!*is_constant) return std::string();
  return ContainerBytes(api, value, data, size);
}

// Reads an optional int attribute that must be 0 or 1 (absent: 0).
OrtStatus* ReadFlagAttribute(const OrtApi* api, const OrtKernelInfo* info, const InputLabel& label, const char* name,
                             bool* value) {
  int64_t v = 0;
  OrtStatus* status = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (status != nullptr) {
    api->ReleaseStatus(status);  // absent: default 0
    v = 0;
  }
  if (v != 0 && v != 1)
    return MakeStatus(api, ORT_INVALID_ARGUMENT,
                      label.Prefix() + "attribute " + name + " must be 0 or 1, got " + std::to_string(v));
  *value = v == 1;
  return nullptr;
}

// A float list attribute; empty when absent.
std::vector<float> ReadFloats(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  size_t size = 0;
  if (!TakeStatusMessage(api, api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size)).empty()) return {};
  std::vector<float> values(size);
  if (size == 0) return values;
  if (!TakeStatusMessage(api, api->KernelInfoGetAttributeArray_float(info, name, values.data(), &size)).empty())
    return {};
  values.resize(std::min(size, values.size()));
  return values;
}

// The fused activation: attributes `activation` (string) and
// `activation_params` (floats). Returns false with a one-line *error.
bool ReadActivation(const OrtApi* api, const OrtKernelInfo* info, ActivationSpec* out, std::string* error) {
  const std::string name = ReadName(
      api, [&](char* text, size_t* size) { return api->KernelInfoGetAttribute_string(info, "activation", text, size); });
  return ParseActivation(name, ReadFloats(api, info, "activation_params"), out, error);
}

// Hands the heap's free pages back to the system. Decoding a container
// allocates and frees arrays of the weight's size (the decoded streams, the
// staging of the layout); glibc keeps such freed memory in the process unless
// asked, and a session would then hold about twice the weight's compressed
// size for good.
void ReleaseFreeHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// Decodes a constant container (input `input`) once, at kernel creation,
// with decode(data, size, weights) -> error; leaves *out null when the
// container is not constant (then it is decoded on every run: WeightsForRun,
// DecompressKernel::Compute).
template <typename Weights, typename Decode>
OrtStatus* DecodeConstantContainer(const OrtApi* api, const OrtKernelInfo* info, const InputLabel& label, size_t input,
                                   Decode decode, std::unique_ptr<Weights>* out) {
  bool constant = false;
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string error = ConstantInput(api, info, input, &constant, &data, &size);
  if (!error.empty()) return MakeStatus(api, ORT_FAIL, label.Prefix() + error);
  if (!constant) return nullptr;
  out->reset(new Weights);
  error = decode(data, size, out->get());
  if (!error.empty()) return MakeStatus(api, ORT_INVALID_GRAPH, label.Prefix() + error);
  ReleaseFreeHeap();
  return nullptr;
}

// The weights of one run: the constant ones decoded at creation, or else the
// container input decoded into *per_call.
template <typename Weights, typename Decode>
std::string WeightsForRun(const OrtApi* api, OrtKernelContext* context, const Weights* constant, Decode decode,
                          Weights* per_call, const Weights** out) {
  *out = constant;
  if (constant != nullptr) return std::string();
  const OrtValue* container = nullptr;
  std::string error = TakeStatusMessage(api, api->KernelContext_GetInput(context, 1, &container));
  const uint8_t* data = nullptr;
  size_t size = 0;
  if (error.empty()) error = ContainerBytes(api, container, &data, &size);
  if (error.empty()) error = decode(data, size, per_call);
  if (error.empty()) *out = per_call;
  return error;
}

// Input `index` of the run, or null when the node has fewer inputs or leaves it out ("").
OrtStatus* OptionalInput(const OrtApi* api, OrtKernelContext* context, size_t index, const OrtValue** value) {
  *value = nullptr;
  size_t input_count = 0;
  OrtStatus* status = api->KernelContext_GetInputCount(context, &input_count);
  if (status != nullptr || input_count <= index) return status;
  return api->KernelContext_GetInput(context, index, value);
}

// Allocates output 0 with y_dims; returns its data and that of the float input x.
OrtStatus* OutputAndInputData(const OrtApi* api, OrtKernelContext* context, const OrtValue* x_value,
                              const std::vector<int64_t>& y_dims, const float** x, float** y) {
  OrtValue* y_value = nullptr;
  OrtStatus* status = api->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y_value);
  if (status != nullptr) return status;
  void* y_data = nullptr;
  status = api->GetTensorMutableData(y_value, &y_data);
  if (status != nullptr) return status;
  void* x_data = nullptr;
  status = api->GetTensorMutableData(const_cast<OrtValue*>(x_value), &x_data);
  if (status != nullptr) return status;
  *x = static_cast<const float*>(x_data);
  *y = static_cast<float*>(y_data);
  return nullptr;
}

// KernelContext_ParallelFor adapter for SparseMatMul.
struct OrtRunner {
  const OrtApi* api;
  OrtKernelContext* context;
};

std::string OrtParallelFor(void* runner, size_t total, void (*fn)(void*, size_t), void* context) {
  if (total == 0) return std::string();
  if (total == 1) {
    fn(context, 0);
    return std::string();
  }
  const OrtRunner& r = *static_cast<const OrtRunner*>(runner);
  return TakeStatusMessage(r.api, r.api->KernelContext_ParallelFor(r.context, fn, total, 0, context));
}

// ------------------------------------------------------------ DCMatMul

// A DCMatMul weight: code panels (most weights kept), the index layout, or,
// for a large weight, the container itself decoded during each run
// (resident_matmul.h).
struct MatMulWeights {
  uint64_t in_features = 0;
  uint64_t out_features = 0;
  std::unique_ptr<PanelWeights> panels;
  std::unique_ptr<SparseWeights> sparse;
  std::unique_ptr<ResidentWeights> resident;
};

class MatMulKernel {
 public:
  MatMulKernel(const OrtApi* api, InputLabel label) : api_(api), label_(std::move(label)) {}

  OrtStatus* Init(const OrtKernelInfo* info) {
    OrtStatus* status = ReadFlagAttribute(api_, info, label_, "trans_b", &trans_b_);
    if (status == nullptr) status = ReadFlagAttribute(api_, info, label_, "relu", &relu_);
    bool sparse_input = false;
    if (status == nullptr) status = ReadFlagAttribute(api_, info, label_, "sparse_input", &sparse_input);
    if (status != nullptr) return status;
    order_ = sparse_input ? SparseOrder::kRows : SparseOrder::kColumns;
    if (status == nullptr) status = ReadResidentAttribute(info);
    if (status != nullptr) return status;
    ReadFloatAttribute(info, "alpha", &alpha_);
    ReadFloatAttribute(info, "beta", &beta_);
    std::string error;
    if (!ReadActivation(api_, info, &activation_, &error)) return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + error);
    if (relu_ && activation_.kind != Activation::kNone && activation_.kind != Activation::kRelu)
      return MakeStatus(api_, ORT_INVALID_ARGUMENT,
                        label_.Prefix() + "relu = 1 contradicts activation \"" + ActivationName(activation_.kind) + "\"");
    if (relu_) activation_.kind = Activation::kRelu;
    const std::string precision = ReadName(
        api_, [&](char* out, size_t* size) { return api_->KernelInfoGetAttribute_string(info, "precision", out, size); });
    if (!precision.empty() && precision != "float" && precision != "bf16x3")
      return MakeStatus(api_, ORT_INVALID_ARGUMENT,
                        label_.Prefix() + "attribute precision must be \"float\" or \"bf16x3\", got \"" + precision + "\"");
    isa_ = DetectKernelIsa();
    gemm_isa_ = DetectGemmIsa(precision == "bf16x3");

    auto decode = [this](const uint8_t* d, size_t n, MatMulWeights* w) { return Decode(d, n, w); };
    status = DecodeConstantContainer(api_, info, label_, 1, decode, &weights_);
    if (status != nullptr || weights_ == nullptr) return status;
    CacheConstantBias(info);
    return nullptr;
  }

  OrtStatus* Compute(OrtKernelContext* context) const {
    const OrtValue* x_value = nullptr;
    OrtStatus* status = api_->KernelContext_GetInput(context, 0, &x_value);
    if (status != nullptr) return status;
    std::vector<int64_t> x_dims;
    std::string error = GetShape(api_, x_value, &x_dims);
    if (!error.empty()) return Fail(error);
    uint64_t x_count = 0;
    if (x_dims.empty() || !ElementCount(x_dims, &x_count)) return Fail("input X must have rank >= 1, got shape " + ShapeString(x_dims));

    const MatMulWeights* weights = nullptr;
    MatMulWeights per_call;
    auto decode = [this](const uint8_t* d, size_t n, MatMulWeights* w) { return Decode(d, n, w); };
    error = WeightsForRun(api_, context, weights_.get(), decode, &per_call, &weights);
    if (!error.empty()) return Fail(error);

    const uint64_t k_count = static_cast<uint64_t>(x_dims.back());
    if (k_count != weights->in_features)
      return Fail("input X has shape " + ShapeString(x_dims) + ", its last dimension must be the weight's K = " +
                  std::to_string(weights->in_features));
    uint64_t rows = 0;
    if (k_count != 0) {
      rows = x_count / k_count;
    } else if (!CountRows(x_dims, &rows)) {
      return Fail("input X has shape " + ShapeString(x_dims) + ", too many rows");
    }

    MatMulArgs args;
    args.rows = rows;
    args.alpha = alpha_;
    args.beta = beta_;
    args.relu = relu_;
    if (bias_cached_ && weights == weights_.get()) {
      args.bias = cached_bias_.bias;
      args.bias_size = cached_bias_.bias_size;
    } else {
      const OrtValue* bias = nullptr;
      status = OptionalInput(api_, context, 2, &bias);
      if (status != nullptr) return status;
      if (bias != nullptr) {
        error = ReadBias(bias, weights->out_features, &args);
        if (!error.empty()) return Fail(error);
      }
    }

    std::vector<int64_t> y_dims(x_dims);
    y_dims.back() = static_cast<int64_t>(weights->out_features);
    status = OutputAndInputData(api_, context, x_value, y_dims, &args.x, &args.y);
    if (status != nullptr) return status;

    OrtRunner runner{api_, context};
    if (weights->resident) {
      args.relu = activation_.kind == Activation::kRelu;
      error = ResidentMatMul(*weights->resident, args, &OrtParallelFor, &runner);
      if (error.empty() && activation_.kind != Activation::kNone && activation_.kind != Activation::kRelu)
        ApplyActivation(args.y, args.rows * weights->out_features, activation_, gemm_isa_);
    } else if (weights->panels) {
      GemmArgs gemm;
      gemm.x = args.x;
      gemm.y = args.y;
      gemm.rows = args.rows;
      gemm.alpha = args.alpha;
      gemm.beta = args.beta;
      gemm.activation = activation_;
      gemm.bias = args.bias;
      gemm.bias_size = args.bias_size;
      error = PanelGemm(*weights->panels, gemm, gemm_isa_, &OrtParallelFor, &runner);
    } else {
      args.relu = activation_.kind == Activation::kRelu;
      error = SparseMatMul(*weights->sparse, args, isa_, &OrtParallelFor, &runner);
      // The index-layout kernels fuse only Relu; the others are a pass over Y.
      if (error.empty() && activation_.kind != Activation::kNone && activation_.kind != Activation::kRelu)
        ApplyActivation(args.y, args.rows * weights->out_features, activation_, gemm_isa_);
    }
    if (!error.empty()) return Fail(error);
    return nullptr;
  }

 private:
  // Product of the leading dimensions (X's last dimension is 0 here, so
  // X's element count says nothing about it); false if it overflows.
  static bool CountRows(const std::vector<int64_t>& dims, uint64_t* rows) {
    uint64_t n = 1;
    for (size_t i = 0; i + 1 < dims.size(); ++i) {
      const uint64_t d = static_cast<uint64_t>(dims[i]);  // ORT shapes are non-negative
      if (d == 0) {
        *rows = 0;
        return true;
      }
      if (n > UINT64_MAX / d) return false;
      n *= d;
    }
    *rows = n;
    return true;
  }

  // "resident": 1 keeps the weight compressed, 0 builds the layout, absent lets its size decide.
  OrtStatus* ReadResidentAttribute(const OrtKernelInfo* info) {
    int64_t v = -1;
    OrtStatus* status = api_->KernelInfoGetAttribute_int64(info, "resident", &v);
    if (status != nullptr) {
      api_->ReleaseStatus(status);
      return nullptr;
    }
    if (v != 0 && v != 1)
      return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + "attribute resident must be 0 or 1, got " +
                                                        std::to_string(v));
    resident_ = static_cast<int>(v);
    return nullptr;
  }

  void ReadFloatAttribute(const OrtKernelInfo* info, const char* name, float* value) {
    float v = 0.0f;
    OrtStatus* status = api_->KernelInfoGetAttribute_float(info, name, &v);
    if (status != nullptr) {
      api_->ReleaseStatus(status);  // absent: keep the default
      return;
    }
    *value = v;
  }

  // A large weight stays compressed (resident_matmul.h): (data, size) is the
  // initializer's bytes, which onnxruntime keeps for the session's life, or
  // the input of the current run.
  std::string Decode(const uint8_t* data, size_t size, MatMulWeights* weights) const {
    DecodedContainer decoded;
    std::string error;
    if (!DecodeContainer(data, size, DecodeOptions(), &decoded, &error)) return error;
    const bool resident = resident_ == 1 || (resident_ == -1 && PreferResident(decoded, size, UsePanels(decoded)));
    if (decoded.info.dtype == DType::kFloat32 && decoded.info.dims.size() == 2 && resident) {
      weights->resident.reset(new ResidentWeights);
      if (!BuildResidentWeights(data, size, decoded, trans_b_, weights->resident.get(), &error)) return error;
      weights->in_features = weights->resident->in_features;
      weights->out_features = weights->resident->out_features;
      return std::string();
    }
    if (UsePanels(decoded)) {
      weights->panels.reset(new PanelWeights);
      if (!BuildPanelWeights(decoded, trans_b_, gemm_isa_, weights->panels.get(), &error)) return error;
      weights->in_features = weights->panels->in_features;
      weights->out_features = weights->panels->out_features;
    } else {
      weights->sparse.reset(new SparseWeights);
      if (!BuildSparseWeights(decoded, trans_b_, order_, weights->sparse.get(), &error)) return error;
      weights->in_features = weights->sparse->in_features;
      weights->out_features = weights->sparse->out_features;
    }
    return std::string();
  }

  // Code panels for weights with at least kPanelKeptFraction of their values
  // kept (and an index for 0 when some are pruned); the index layout otherwise.
  static bool UsePanels(const DecodedContainer& decoded) {
    const ContainerInfo& info = decoded.info;
    if (info.dtype != DType::kFloat32 || info.dims.size() != 2 || info.numel == 0) return false;
    if (!PanelsPossible(decoded)) return false;
    uint64_t kept = 0;
    for (uint16_t c : decoded.codes) kept += (c != info.codebook_size);
    return static_cast<double>(kept) >= kPanelKeptFraction * static_cast<double>(info.numel);
  }

  // Gemm's C broadcast per column: shape [N], [1, N], [1], [1, 1] or [].
  // A constant bias (an initializer, the usual case) is read once here instead
  // of on every run: a valid one is cached; anything else is left to Compute,
  // which reports a bad bias when the model is run.
  void CacheConstantBias(const OrtKernelInfo* info) {
    size_t input_count = 0;
    OrtStatus* status = api_->KernelInfo_GetInputCount(info, &input_count);
    if (status != nullptr) {
      api_->ReleaseStatus(status);
      return;
    }
    if (input_count <= 2) {
      bias_cached_ = true;  // no bias input
      return;
    }
    int constant = 0;
    const OrtValue* bias = nullptr;
    status = api_->KernelInfoGetConstantInput_tensor(info, 2, &constant, &bias);
    if (status != nullptr) {
      api_->ReleaseStatus(status);
      return;
    }
    if (constant == 0 || bias == nullptr) return;
    MatMulArgs args;
    if (!ReadBias(bias, weights_->out_features, &args).empty()) return;
    cached_bias_ = args;
    bias_cached_ = true;
  }

  std::string ReadBias(const OrtValue* bias, uint64_t n_count, MatMulArgs* args) const {
    std::vector<int64_t> dims;
    std::string error = GetShape(api_, bias, &dims);
    if (!error.empty()) return error;
    uint64_t count = 0;
    bool ok = ElementCount(dims, &count) && dims.size() <= 2 && (count == 1 || count == n_count);
    if (ok && dims.size() == 2 && dims[0] != 1) ok = false;
    if (!ok)
      return "bias has shape " + ShapeString(dims) + "; it must broadcast per output column: [" +
             std::to_string(n_count) + "], [1, " + std::to_string(n_count) + "] or [1]";
    void* data = nullptr;
    error = TakeStatusMessage(api_, api_->GetTensorMutableData(const_cast<OrtValue*>(bias), &data));
    if (!error.empty()) return error;
    args->bias = static_cast<const float*>(data);
    args->bias_size = count;
    if (count == 0) args->bias = nullptr;  // N == 0: nothing to add
    return std::string();
  }

  OrtStatus* Fail(const std::string& message) const {
    return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + message);
  }

  const OrtApi* api_;
  InputLabel label_;
  bool trans_b_ = false;
  float alpha_ = 1.0f;
  float beta_ = 1.0f;
  bool relu_ = false;
  ActivationSpec activation_;
  GemmIsa gemm_isa_ = GemmIsa::kGeneric;
  SparseOrder order_ = SparseOrder::kColumns;
  int resident_ = -1;  // the "resident" attribute: -1 absent (size decides), 0 or 1
  bool bias_cached_ = false;  // cached_bias_ holds the bias (or none): Compute does not read input 2
  MatMulArgs cached_bias_;    // only bias and bias_size are used
  KernelIsa isa_ = KernelIsa::kGeneric;
  std::unique_ptr<MatMulWeights> weights_;  // null: the container is not constant
};

// ------------------------------------------------------------ DCConv

// ONNX Conv (2-D, NCHW, float32) with the weight given as a container; the
// convolution itself is in conv.cc.
class ConvKernel {
 public:
  ConvKernel(const OrtApi* api, InputLabel label) : api_(api), label_(std::move(label)) {}

  OrtStatus* Init(const OrtKernelInfo* info) {
    attributes_.kernel_shape = ReadInts(info, "kernel_shape");
    attributes_.strides = ReadInts(info, "strides");
    attributes_.pads = ReadInts(info, "pads");
    attributes_.dilations = ReadInts(info, "dilations");
    OrtStatus* status = api_->KernelInfoGetAttribute_int64(info, "group", &attributes_.group);
    if (status != nullptr) {
      api_->ReleaseStatus(status);  // absent: default 1
      attributes_.group = 1;
    }
    const std::string auto_pad = ReadName(
        api_, [&](char* out, size_t* size) { return api_->KernelInfoGetAttribute_string(info, "auto_pad", out, size); });
    std::string error;
    if (!ParseAutoPad(auto_pad, &attributes_.auto_pad, &error))
      return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + error);
    if (!ReadActivation(api_, info, &activation_, &error))
      return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + error);
    isa_ = DetectKernelIsa();
    gemm_isa_ = DetectGemmIsa();

    auto decode = [this](const uint8_t* d, size_t n, ConvWeights* w) { return Decode(d, n, w); };
    return DecodeConstantContainer(api_, info, label_, 1, decode, &weights_);
  }

  OrtStatus* Compute(OrtKernelContext* context) const {
    const OrtValue* x_value = nullptr;
    OrtStatus* status = api_->KernelContext_GetInput(context, 0, &x_value);
    if (status != nullptr) return status;
    std::vector<int64_t> x_dims;
    std::string error = GetShape(api_, x_value, &x_dims);
    if (!error.empty()) return Fail(error);

    const ConvWeights* weights = nullptr;
    ConvWeights per_call;
    auto decode = [this](const uint8_t* d, size_t n, ConvWeights* w) { return Decode(d, n, w); };
    error = WeightsForRun(api_, context, weights_.get(), decode, &per_call, &weights);
    if (!error.empty()) return Fail(error);
    ConvGeometry geometry;
    if (!ComputeConvGeometry(*weights, x_dims, &geometry, &error)) return Fail(error);

    const float* bias = nullptr;
    const OrtValue* bias_value = nullptr;
    status = OptionalInput(api_, context, 2, &bias_value);
    if (status != nullptr) return status;
    if (bias_value != nullptr) {
      std::vector<int64_t> dims;
      error = GetShape(api_, bias_value, &dims);
      if (!error.empty()) return Fail(error);
      if (dims.size() != 1 || static_cast<uint64_t>(dims[0]) != weights->out_channels)
        return Fail("bias B has shape " + ShapeString(dims) + ", it must be [" +
                    std::to_string(weights->out_channels) + "] (one value per output channel)");
      void* data = nullptr;
      status = api_->GetTensorMutableData(const_cast<OrtValue*>(bias_value), &data);
      if (status != nullptr) return status;
      bias = static_cast<const float*>(data);
    }

    const std::vector<int64_t> y_dims = {static_cast<int64_t>(geometry.batch),
                                         static_cast<int64_t>(weights->out_channels),
                                         static_cast<int64_t>(geometry.out_h), static_cast<int64_t>(geometry.out_w)};
    const float* x = nullptr;
    float* y = nullptr;
    status = OutputAndInputData(api_, context, x_value, y_dims, &x, &y);
    if (status != nullptr) return status;

    OrtRunner runner{api_, context};
    error = RunConv(*weights, geometry, x, bias, y, activation_, isa_, gemm_isa_, &OrtParallelFor, &runner);
    if (!error.empty()) return Fail(error);
    return nullptr;
  }

 private:
  // An int64 list attribute; empty when absent.
  std::vector<int64_t> ReadInts(const OrtKernelInfo* info, const char* name) const {
    size_t size = 0;
    if (!TakeStatusMessage(api_, api_->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)).empty())
      return {};
    std::vector<int64_t> values(size);
    if (size == 0) return values;
    if (!TakeStatusMessage(api_, api_->KernelInfoGetAttributeArray_int64(info, name, values.data(), &size)).empty())
      return {};
    values.resize(std::min(size, values.size()));
    return values;
  }

  std::string Decode(const uint8_t* data, size_t size, ConvWeights* weights) const {
    DecodedContainer decoded;
    std::string error;
    if (!DecodeContainer(data, size, DecodeOptions(), &decoded, &error)) return error;
    if (!BuildConvWeights(decoded, attributes_, gemm_isa_, weights, &error)) return error;
    return std::string();
  }

  OrtStatus* Fail(const std::string& message) const {
    return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + message);
  }

  const OrtApi* api_;
  InputLabel label_;
  ConvAttributes attributes_;
  ActivationSpec activation_;
  KernelIsa isa_ = KernelIsa::kGeneric;
  GemmIsa gemm_isa_ = GemmIsa::kGeneric;
  std::unique_ptr<ConvWeights> weights_;  // null: the container is not constant
};

// ------------------------------------------------------------ DCDecompress

// Shape of a decoded container as onnxruntime dims; an error message or "".
std::string OnnxDims(const std::vector<uint64_t>& dims, std::vector<int64_t>* out) {
  out->clear();
  for (uint64_t d : dims) {
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return "dimension " + std::to_string(d) + " does not fit an onnxruntime shape";
    out->push_back(static_cast<int64_t>(d));
  }
  return std::string();
}

// DCDecompress*: the container's tensor, expanded on every run from its
// compact form (compact.h: uint8 codebook indices or sparse rows; the dense
// bytes only when neither fits), so a session holds about a byte per element
// instead of the dense tensor, and a run reads a byte per element instead of
// copying itemsize bytes.
class DecompressKernel {
 public:
  DecompressKernel(const OrtApi* api, InputLabel label, DType dtype)
      : api_(api), label_(std::move(label)), dtype_(dtype) {}

  OrtStatus* Init(const OrtKernelInfo* info) {
    auto decode = [this](const uint8_t* data, size_t size, CompactTensor* tensor) { return Decode(data, size, tensor); };
    return DecodeConstantContainer(api_, info, label_, 0, decode, &constant_);
  }

  OrtStatus* Compute(OrtKernelContext* context) const {
    CompactTensor per_call;
    const CompactTensor* tensor = constant_.get();
    if (tensor == nullptr) {
      const OrtValue* container = nullptr;
      OrtStatus* status = api_->KernelContext_GetInput(context, 0, &container);
      if (status != nullptr) return status;
      const uint8_t* data = nullptr;
      size_t size = 0;
      std::string error = ContainerBytes(api_, container, &data, &size);
      if (error.empty()) error = Decode(data, size, &per_call);
      if (!error.empty()) return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + error);
      tensor = &per_call;
    }
    std::vector<int64_t> dims;
    std::string error = OnnxDims(tensor->dims, &dims);
    if (!error.empty()) return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + error);
    OrtValue* y_value = nullptr;
    OrtStatus* status = api_->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y_value);
    if (status != nullptr) return status;
    void* y = nullptr;
    status = api_->GetTensorMutableData(y_value, &y);
    if (status != nullptr) return status;
    ExpandRows(*tensor, 0, tensor->rows, y);
    return nullptr;
  }

 private:
  std::string Decode(const uint8_t* data, size_t size, CompactTensor* tensor) const {
    DecodedContainer decoded;
    std::string error;
    if (!DecodeContainer(data, size, DecodeOptions(), &decoded, &error)) return error;
    const DType dtype = decoded.info.dtype;
    if (dtype != dtype_)
      return std::string("the container holds ") + DTypeName(dtype) + " but " + DecompressOpName(dtype_) +
             " outputs " + DTypeName(dtype_) + "; use " + DecompressOpName(dtype) + " for it";
    std::vector<int64_t> dims;
    error = OnnxDims(decoded.info.dims, &dims);
    if (!error.empty()) return error;
    BuildCompactTensor(decoded, /*prefer_codes=*/true, tensor);
    return std::string();
  }

  const OrtApi* api_;
  InputLabel label_;
  DType dtype_;
  std::unique_ptr<CompactTensor> constant_;  // null: the container is not constant
};

// ------------------------------------------------------------ DCGather

// ONNX Gather(data, indices, axis = 0) with `data` a float32 container of
// rank >= 1: only the rows the indices name are expanded, from the compact
// form (codes or sparse rows), on every run.
class GatherKernel {
 public:
  GatherKernel(const OrtApi* api, InputLabel label) : api_(api), label_(std::move(label)) {}

  OrtStatus* Init(const OrtKernelInfo* info) {
    int64_t axis = 0;
    OrtStatus* status = api_->KernelInfoGetAttribute_int64(info, "axis", &axis);
    if (status != nullptr) {
      api_->ReleaseStatus(status);  // absent: 0
      axis = 0;
    }
    axis_ = axis;
    auto decode = [this](const uint8_t* data, size_t size, CompactTensor* tensor) { return Decode(data, size, tensor); };
    return DecodeConstantContainer(api_, info, label_, 0, decode, &constant_);
  }

  OrtStatus* Compute(OrtKernelContext* context) const {
    CompactTensor per_call;
    const CompactTensor* tensor = constant_.get();
    if (tensor == nullptr) {
      const OrtValue* container = nullptr;
      OrtStatus* status = api_->KernelContext_GetInput(context, 0, &container);
      if (status != nullptr) return status;
      const uint8_t* data = nullptr;
      size_t size = 0;
      std::string error = ContainerBytes(api_, container, &data, &size);
      if (error.empty()) error = Decode(data, size, &per_call);
      if (!error.empty()) return Fail(error);
      tensor = &per_call;
    }
    const OrtValue* indices_value = nullptr;
    OrtStatus* status = api_->KernelContext_GetInput(context, 1, &indices_value);
    if (status != nullptr) return status;
    std::vector<int64_t> index_dims;
    std::string error = GetShape(api_, indices_value, &index_dims);
    if (!error.empty()) return Fail(error);
    uint64_t count = 0;
    if (!ElementCount(index_dims, &count)) return Fail("invalid indices shape " + ShapeString(index_dims));
    OrtTensorTypeAndShapeInfo* raw_info = nullptr;
    status = api_->GetTensorTypeAndShape(indices_value, &raw_info);
    if (status != nullptr) return status;
    TensorInfoPtr type_info(raw_info, TensorInfoDeleter{api_});
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    status = api_->GetTensorElementType(type_info.get(), &type);
    if (status != nullptr) return status;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      return Fail("indices must be int64 or int32, got element type " + std::to_string(static_cast<int>(type)));
    void* index_data = nullptr;
    status = api_->GetTensorMutableData(const_cast<OrtValue*>(indices_value), &index_data);
    if (status != nullptr) return status;

    // Rows, checked before anything is written (negative indices count from the end, as ONNX).
    const int64_t rows = static_cast<int64_t>(tensor->rows);
    std::vector<uint64_t> selected(static_cast<size_t>(count));
    for (uint64_t i = 0; i < count; ++i) {
      const int64_t raw = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? static_cast<const int64_t*>(index_data)[i]
                                                                      : static_cast<const int32_t*>(index_data)[i];
      const int64_t index = raw < 0 ? raw + rows : raw;
      if (index < 0 || index >= rows)
        return Fail("index " + std::to_string(raw) + " (element " + std::to_string(i) + " of indices) is out of range for " +
                    std::to_string(rows) + " rows; valid: -" + std::to_string(rows) + " .. " +
                    std::to_string(rows - 1));
      selected[static_cast<size_t>(i)] = static_cast<uint64_t>(index);
    }
    std::vector<int64_t> y_dims(index_dims);
    std::vector<int64_t> data_dims;
    error = OnnxDims(tensor->dims, &data_dims);
    if (!error.empty()) return Fail(error);
    y_dims.insert(y_dims.end(), data_dims.begin() + 1, data_dims.end());
    uint64_t y_count = 0;
    if (!ElementCount(y_dims, &y_count) || y_count > (uint64_t{1} << 40))
      return Fail("output shape " + ShapeString(y_dims) + " is too large");
    OrtValue* y_value = nullptr;
    status = api_->KernelContext_GetOutput(context, 0, y_dims.data(), y_dims.size(), &y_value);
    if (status != nullptr) return status;
    void* y = nullptr;
    status = api_->GetTensorMutableData(y_value, &y);
    if (status != nullptr) return status;
    if (y_count == 0) return nullptr;

    GatherRun run{tensor, selected.data(), count, static_cast<float*>(y)};
    const uint64_t chunks = (count + kRowsPerTask - 1) / kRowsPerTask;
    if (y_count < (uint64_t{1} << 16) || chunks < 2) {
      for (uint64_t c = 0; c < chunks; ++c) GatherChunk(&run, static_cast<size_t>(c));
      return nullptr;
    }
    OrtRunner runner{api_, context};
    error = OrtParallelFor(&runner, static_cast<size_t>(chunks), &GatherChunk, &run);
    if (!error.empty()) return Fail(error);
    return nullptr;
  }

 private:
  static constexpr uint64_t kRowsPerTask = 16;

  struct GatherRun {
    const CompactTensor* tensor;
    const uint64_t* rows;
    uint64_t count;
    float* y;
  };

  static void GatherChunk(void* context, size_t chunk) {
    const GatherRun& run = *static_cast<const GatherRun*>(context);
    const uint64_t first = uint64_t{chunk} * kRowsPerTask;
    const uint64_t end = std::min<uint64_t>(first + kRowsPerTask, run.count);
    const uint64_t row_size = run.tensor->row_size;
    for (uint64_t i = first; i < end; ++i) ExpandRows(*run.tensor, run.rows[i], 1, run.y + i * row_size);
  }

  std::string Decode(const uint8_t* data, size_t size, CompactTensor* tensor) const {
    DecodedContainer decoded;
    std::string error;
    if (!DecodeContainer(data, size, DecodeOptions(), &decoded, &error)) return error;
    if (decoded.info.dtype != DType::kFloat32)
      return std::string("the data must be float32, the container holds ") + DTypeName(decoded.info.dtype);
    const int64_t rank = static_cast<int64_t>(decoded.info.dims.size());
    if (rank < 1) return "the data must have rank >= 1, the container holds a scalar";
    if (axis_ != 0 && axis_ != -rank)
      return "axis must be 0 (DCGather gathers rows), got " + std::to_string(axis_);
    std::vector<int64_t> dims;
    error = OnnxDims(decoded.info.dims, &dims);
    if (!error.empty()) return error;
    BuildCompactTensor(decoded, /*prefer_codes=*/false, tensor);
    return std::string();
  }

  OrtStatus* Fail(const std::string& message) const {
    return MakeStatus(api_, ORT_INVALID_ARGUMENT, label_.Prefix() + message);
  }

  const OrtApi* api_;
  InputLabel label_;
  int64_t axis_ = 0;
  std::unique_ptr<CompactTensor> constant_;  // null: the container is not constant
};

// ------------------------------------------------------------ OrtCustomOp callbacks

struct KernelBox {
  const OrtApi* api;
  std::string op_name;
  OpKind kind;
  std::unique_ptr<MatMulKernel> matmul;
  std::unique_ptr<DecompressKernel> decompress;
  std::unique_ptr<ConvKernel> conv;
  std::unique_ptr<GatherKernel> gather;
};

OrtStatusPtr ORT_API_CALL CreateKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                       void** kernel) {
  const OpDef& def = DefOf(op);
  *kernel = nullptr;
  return Guarded(api, std::string(def.name) + ": ", [&]() -> OrtStatus* {
    std::unique_ptr<KernelBox> box(new KernelBox);
    box->api = api;
    box->op_name = def.name;
    box->kind = def.kind;
    InputLabel label;
    label.op = def.name;
    label.node =
        ReadName(api, [&](char* out, size_t* size) { return api->KernelInfo_GetNodeName(info, out, size); });
    const size_t container_index = def.kind == OpKind::kDecompress || def.kind == OpKind::kGather ? 0 : 1;
    label.input = ReadName(
        api, [&](char* out, size_t* size) { return api->KernelInfo_GetInputName(info, container_index, out, size); });
    OrtStatus* status = nullptr;
    if (def.kind == OpKind::kMatMul) {
      box->matmul.reset(new MatMulKernel(api, label));
      status = box->matmul->Init(info);
    } else if (def.kind == OpKind::kGather) {
      box->gather.reset(new GatherKernel(api, label));
      status = box->gather->Init(info);
    } else if (def.kind == OpKind::kConv) {
      box->conv.reset(new ConvKernel(api, label));
      status = box->conv->Init(info);
    } else {
      box->decompress.reset(new DecompressKernel(api, label, def.dtype));
      status = box->decompress->Init(info);
    }
    if (status != nullptr) return status;
    *kernel = box.release();
    return nullptr;
  });
}

OrtStatusPtr ORT_API_CALL ComputeKernel(void* kernel, OrtKernelContext* context) {
  const KernelBox& box = *static_cast<const KernelBox*>(kernel);
  return Guarded(box.api, box.op_name + ": ", [&]() -> OrtStatus* {
    if (box.kind == OpKind::kConv) return box.conv->Compute(context);
    if (box.kind == OpKind::kGather) return box.gather->Compute(context);
    return box.kind == OpKind::kMatMul ? box.matmul->Compute(context) : box.decompress->Compute(context);
  });
}

void ORT_API_CALL DestroyKernel(void* kernel) { delete static_cast<KernelBox*>(kernel); }

const char* ORT_API_CALL GetName(const OrtCustomOp* op) { return DefOf(op).name; }
const char* ORT_API_CALL GetExecutionProviderType(const OrtCustomOp*) { return nullptr; }  // CPU

size_t ORT_API_CALL GetInputTypeCount(const OrtCustomOp* op) {
  const OpKind kind = DefOf(op).kind;
  return kind == OpKind::kDecompress ? 1 : kind == OpKind::kGather ? 2 : 3;
}
ONNXTensorElementDataType ORT_API_CALL GetInputType(const OrtCustomOp* op, size_t index) {
  if (DefOf(op).kind == OpKind::kGather)  // indices: int64 or int32, checked when run
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (DefOf(op).kind != OpKind::kDecompress)
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetInputCharacteristic(const OrtCustomOp* op, size_t index) {
  const OpKind kind = DefOf(op).kind;
  return (kind == OpKind::kMatMul || kind == OpKind::kConv) && index == 2 ? INPUT_OUTPUT_OPTIONAL
                                                                          : INPUT_OUTPUT_REQUIRED;
}
size_t ORT_API_CALL GetOutputTypeCount(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL GetOutputType(const OrtCustomOp* op, size_t) {
  return DefOf(op).kind == OpKind::kDecompress ? OnnxType(DefOf(op).dtype) : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL GetOutputCharacteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL GetInputMemoryType(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL GetVariadicMinArity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL GetVariadicHomogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL GetStartVersion(const OrtCustomOp*) { return 1; }
int ORT_API_CALL GetEndVersion(const OrtCustomOp*) { return std::numeric_limits<int>::max(); }
size_t ORT_API_CALL GetNoPairs(int** input_index, int** output_index) {
  *input_index = nullptr;
  *output_index = nullptr;
  return 0;
}
void ORT_API_CALL ReleaseNoPairs(int*, int*) {}

OpDef MakeOpDef(const char* name, OpKind kind, DType dtype) {
  OpDef def;
  std::memset(&def.base, 0, sizeof(def.base));
  OrtCustomOp& op = def.base;
  op.version = kOrtApiVersion;
  op.CreateKernel = nullptr;  // the V2 entry points below replace it
  op.GetName = &GetName;
  op.GetExecutionProviderType = &GetExecutionProviderType;
  op.GetInputType = &GetInputType;
  op.GetInputTypeCount = &GetInputTypeCount;
  op.GetOutputType = &GetOutputType;
  op.GetOutputTypeCount = &GetOutputTypeCount;
  op.KernelCompute = nullptr;
  op.KernelDestroy = &DestroyKernel;
  op.GetInputCharacteristic = &GetInputCharacteristic;
  op.GetOutputCharacteristic = &GetOutputCharacteristic;
  op.GetInputMemoryType = &GetInputMemoryType;
  op.GetVariadicInputMinArity = &GetVariadicMinArity;
  op.GetVariadicInputHomogeneity = &GetVariadicHomogeneity;
  op.GetVariadicOutputMinArity = &GetVariadicMinArity;
  op.GetVariadicOutputHomogeneity = &GetVariadicHomogeneity;
  op.CreateKernelV2 = &CreateKernel;
  op.KernelComputeV2 = &ComputeKernel;
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = &GetStartVersion;
  op.GetEndVersion = &GetEndVersion;
  op.GetMayInplace = &GetNoPairs;
  op.ReleaseMayInplace = &ReleaseNoPairs;
  op.GetAliasMap = &GetNoPairs;
  op.ReleaseAliasMap = &ReleaseNoPairs;
  def.name = name;
  def.kind = kind;
  def.dtype = dtype;
  return def;
}

constexpr size_t kNumOps = 7;

const OpDef* OpDefs() {
  static const OpDef defs[kNumOps] = {
      MakeOpDef("DCMatMul", OpKind::kMatMul, DType::kFloat32),
      MakeOpDef("DCConv", OpKind::kConv, DType::kFloat32),
      MakeOpDef("DCGather", OpKind::kGather, DType::kFloat32),
      MakeOpDef(DecompressOpName(DType::kFloat32), OpKind::kDecompress, DType::kFloat32),
      MakeOpDef(DecompressOpName(DType::kFloat16), OpKind::kDecompress, DType::kFloat16),
      MakeOpDef(DecompressOpName(DType::kFloat64), OpKind::kDecompress, DType::kFloat64),
      MakeOpDef(DecompressOpName(DType::kBFloat16), OpKind::kDecompress, DType::kBFloat16),
  };
  return defs;
}

// The one OrtCustomOpDomain of this library, created on first registration and
// shared by every session options object it is added to (onnxruntime only
// reads it). Released when the library is unloaded.
class DomainRegistry {
 public:
  ~DomainRegistry() {
    if (domain_ != nullptr) api_->ReleaseCustomOpDomain(domain_);
  }

  OrtStatus* AddTo(OrtSessionOptions* options, const OrtApi* api) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (domain_ == nullptr) {
      OrtCustomOpDomain* domain = nullptr;
      OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain);
      if (status != nullptr) return status;
      const OpDef* defs = OpDefs();
      for (size_t i = 0; i < kNumOps; ++i) {
        status = api->CustomOpDomain_Add(domain, &defs[i].base);
        if (status != nullptr) {
          api->ReleaseCustomOpDomain(domain);
          return status;
        }
      }
      domain_ = domain;
      api_ = api;
    }
    return api->AddCustomOpDomain(options, domain_);
  }

 private:
  std::mutex mutex_;
  const OrtApi* api_ = nullptr;
  OrtCustomOpDomain* domain_ = nullptr;
};

DomainRegistry& Registry() {
  static DomainRegistry registry;
  return registry;
}

}  // namespace
}  // namespace onnx_dc

extern "C" ONNX_DC_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // cannot report anything without an API table
  const OrtApi* api = api_base->GetApi(onnx_dc::kOrtApiVersion);
  if (api == nullptr) {
    // Too old an onnxruntime: report through the oldest API table, which every
    // release serves.
    const OrtApi* oldest = api_base->GetApi(1);
    if (oldest == nullptr) return nullptr;
    const std::string message = std::string("the onnx-dc operator library needs onnxruntime >= 1.21, this is ") +
                                api_base->GetVersionString();
    return oldest->CreateStatus(ORT_FAIL, message.c_str());
  }
  try {
    return onnx_dc::Registry().AddTo(options, api);
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "onnx-dc: registering the custom operators failed (out of memory)");
  }
}
