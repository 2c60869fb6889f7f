// SparseMatMul kernels compiled for AVX2 + FMA (+ BMI2 shifts). This file is
// built with -mavx2 -mfma -mbmi2 and only called when the CPU reports all
// three (DetectKernelIsa).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "matmul_kernels.h"
#include "sparse_matmul.h"

namespace onnx_dc {
namespace avx2 {

#include "matmul_kernels_impl.h"

}  // namespace avx2
}  // namespace onnx_dc
