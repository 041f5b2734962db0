// Fused multi-tensor EMA update (docs/math.md §4), shared by the CPU (ema.cpp) and CUDA (ema_cuda.cu) halves.
//
//   for every pair i:  target[i] <- lerp(target[i], online[i], w),  w = 1 - momentum
//   for every pair j:  copy_target[j] <- copy_source[j]             (bytes, any dtype)
//
// lerp(a, b, w) = a + w (b - a) if w < 0.5 else b - (b - a)(1 - w): the formula of
// torch.lerp, exact at both ends (momentum 1 keeps target, momentum 0 gives online).
// Math in at::opmath_type<target dtype> (fp32 for fp32/bf16/fp16 targets, fp64 for fp64).
//
// The op is minc_kernels::ema_update_ (one namespace with the package's Triton ops); its
// Python side (fake implementation, DTensor handling) is minc_kernels/_ext.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace minc_kernels {

template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t ema_lerp(acc_t target, acc_t online, acc_t w) {
  return w < acc_t(0.5) ? target + w * (online - target)
                        : online - (online - target) * (acc_t(1) - w);
}

// The momentum of one call: a host value, or (a 0-dim CUDA tensor passed as momentum) a
// pointer the CUDA kernel reads on the device, so that a scheduled momentum living on the
// GPU costs no host sync (its range is then not checked: reading it would be a sync).
struct EmaMomentum {
  double value = 0.0;
  const void* device_ptr = nullptr;  // float or double, read by the kernel when set
  bool device_double = false;
};

// Every check of the op, done before anything is written or any data pointer is read:
//   1. list lengths, defined tensors, one device for every tensor of the four lists
//      (devices only: no size, stride or data pointer is touched before this passes),
//      the device a CPU or CUDA one, and `expect` (the kernel's device type) when given;
//   2. the momentum (a double, or a 0-dim float32/float64 tensor on the CPU or that device);
//   3. dtypes, shapes, layouts, and the argument order (a target that requires grad paired
//      with an online tensor that does not: the lists look swapped);
//   4. aliasing (data pointers, last): written tensors pairwise disjoint, and a written
//      tensor overlaps no read tensor except its own partner when both are the same memory.
// A bad call raises (ValueError / TypeError naming the argument) and leaves every tensor
// untouched.  `momentum_tensor` is null for the float overloads.
EmaMomentum check_ema_args(at::TensorList target, at::TensorList online,
                           const at::Tensor* momentum_tensor, double momentum,
                           at::TensorList copy_target, at::TensorList copy_source,
                           std::optional<c10::DeviceType> expect);

void ema_update_cpu(at::TensorList target, at::TensorList online, double momentum,
                    at::TensorList copy_target, at::TensorList copy_source);
void ema_update_cpu_tensor(at::TensorList target, at::TensorList online,
                           const at::Tensor& momentum, at::TensorList copy_target,
                           at::TensorList copy_source);

#ifdef MINC_WITH_CUDA
// The CUDA kernels (ema_cuda.cu), called only after check_ema_args passed: the CUDA entry
// points and their registration are in ema.cpp, so every argument error is raised by
// host-compiled code before any CUDA-file code runs.
void run_cuda(at::TensorList target, at::TensorList online, const EmaMomentum& momentum,
              at::TensorList copy_target, at::TensorList copy_source);
// CUDA runtime version the kernels were compiled with (CUDART_VERSION), e.g. 13000.
int cuda_runtime_version_compiled();
#endif

}  // namespace minc_kernels
