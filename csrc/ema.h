// Fused multi-tensor EMA update (docs/math.md §4), shared by the CPU (ema.cpp) and CUDA (ema_cuda.cu) halves.
//
//   for every pair i:  target[i] <- lerp(target[i], online[i], w),  w = 1 - momentum
//   for every pair j:  copy_target[j] <- copy_source[j]             (bytes, any dtype)
//
// lerp(a, b, w) = a + w (b - a) if w < 0.5 else b - (b - a)(1 - w): the formula of
// torch.lerp, exact at both ends (momentum 1 keeps target, momentum 0 gives online).
// Math in at::opmath_type<target dtype> (fp32 for fp32/bf16/fp16 targets, fp64 for fp64).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

namespace minc {

template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t ema_lerp(acc_t target, acc_t online, acc_t w) {
  return w < acc_t(0.5) ? target + w * (online - target)
                        : online - (online - target) * (acc_t(1) - w);
}

// Every check of the op, done before anything is written: a bad call raises
// (ValueError / TypeError naming the argument) and leaves every tensor untouched.
void check_ema_args(at::TensorList target, at::TensorList online, double momentum,
                    at::TensorList copy_target, at::TensorList copy_source);

void ema_update_cpu(at::TensorList target, at::TensorList online, double momentum,
                    at::TensorList copy_target, at::TensorList copy_source);

#ifdef MINC_WITH_CUDA
void ema_update_cuda(at::TensorList target, at::TensorList online, double momentum,
                     at::TensorList copy_target, at::TensorList copy_source);
// CUDA runtime version the kernels were compiled with (CUDART_VERSION), e.g. 13000.
int cuda_runtime_version_compiled();
#endif

}  // namespace minc
