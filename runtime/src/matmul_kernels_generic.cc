// SparseMatMul kernels compiled for the baseline x86-64 instruction set.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "matmul_kernels.h"
#include "sparse_matmul.h"

namespace onnx_dc {
namespace generic {

#include "matmul_kernels_impl.h"

}  // namespace generic
}  // namespace onnx_dc
