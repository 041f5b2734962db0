// CUDA half of minc_kernels::ema_update_: one multi-tensor kernel, apex multi_tensor_apply style.
//
// The tensors of one (target dtype, online dtype) group are packed, up to kMaxTensors
// at a time, into a table passed by value as kernel arguments (no host-to-device copy,
// CUDA-graph capturable). Each tensor is cut into chunks of kChunk elements; block b
// finds its tensor by binary search over the table's running chunk counts, so a launch
// has exactly as many blocks as chunks. Inside a chunk: 16-byte vector loads/stores
// when both base pointers are aligned (chunks start at multiples of kChunk, so every
// chunk of an aligned tensor is aligned), a masked scalar tail, scalar code otherwise.
// Copy pairs go through the same kernel as raw bytes (16 per vector).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "ema.h"

namespace minc_kernels {
namespace {

constexpr int kMaxTensors = 128;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // vectors in flight per thread: loads issued before any store

// Passed by value: 128 * (8 + 8 + 8 + 1) + 129 * 4 + 4 = 3720 bytes, under the 4 KiB
// kernel-argument limit that holds for every CUDA version and architecture.
struct TensorTable {
  void* dst[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];  // running chunk count; chunk_start[0] = 0
  uint8_t aligned[kMaxTensors];          // both pointers aligned for vector access
  int32_t count;
};
static_assert(sizeof(TensorTable) + 64 <= 4096, "kernel arguments over the 4 KiB limit");

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t>
struct LerpOp {
  static constexpr bool kReadsTarget = true;
  acc_t w;  // 1 - momentum
  // A momentum tensor on the device (EmaMomentum::device_ptr): read once per thread by
  // load(), so the host never waits for it.
  const void* momentum_ptr = nullptr;
  bool momentum_double = false;
  __device__ __forceinline__ void load() {
    if (momentum_ptr != nullptr) {
      const double m = momentum_double ? *static_cast<const double*>(momentum_ptr)
                                       : static_cast<double>(*static_cast<const float*>(momentum_ptr));
      w = static_cast<acc_t>(1.0 - m);
    }
  }
  template <typename T, typename S>
  __device__ __forceinline__ T operator()(T target, S online) const {
    return static_cast<T>(ema_lerp<acc_t>(static_cast<acc_t>(target), static_cast<acc_t>(online), w));
  }
};

struct CopyOp {
  static constexpr bool kReadsTarget = false;  // whole vectors are moved, never unpacked
  __device__ __forceinline__ void load() {}
  template <typename T>
  __device__ __forceinline__ T operator()(T, T source) const { return source; }
};

template <typename T, typename S, int N, typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorTable table, const int64_t chunk, const Op op_arg) {
  Op op = op_arg;
  op.load();
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = table.count - 1;  // the last tensor whose first chunk is <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.chunk_start[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t first = static_cast<int64_t>(block - table.chunk_start[lo]) * chunk;
  const int64_t rest = table.numel[lo] - first;
  const int64_t len = rest < chunk ? rest : chunk;
  T* __restrict__ dst = static_cast<T*>(table.dst[lo]) + first;
  const S* __restrict__ src = static_cast<const S*>(table.src[lo]) + first;

  int64_t done = 0;
  if (table.aligned[lo]) {
    using DV = Vec<T, N>;
    using SV = Vec<S, N>;
    DV* __restrict__ dv = reinterpret_cast<DV*>(dst);
    const SV* __restrict__ sv = reinterpret_cast<const SV*>(src);
    const int64_t nvec = len / N;
    for (int64_t base = threadIdx.x; base < nvec; base += static_cast<int64_t>(kThreads) * kUnroll) {
      DV d[kUnroll];
      SV s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + static_cast<int64_t>(u) * kThreads;
        if (k < nvec) {
          if constexpr (Op::kReadsTarget) d[u] = dv[k];
          s[u] = sv[k];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + static_cast<int64_t>(u) * kThreads;
        if (k < nvec) {
          if constexpr (Op::kReadsTarget) {
#pragma unroll
            for (int e = 0; e < N; ++e) d[u].v[e] = op(d[u].v[e], s[u].v[e]);
            dv[k] = d[u];
          } else {
            dv[k] = s[u];
          }
        }
      }
    }
    done = nvec * N;
  }
  for (int64_t k = done + threadIdx.x; k < len; k += kThreads) dst[k] = op(dst[k], src[k]);
}

// Launches `kernel` over the pairs, kMaxTensors (and < INT_MAX chunks) per launch.
template <typename T, typename S, int N, typename Op>
void launch_pairs(const std::vector<std::pair<void*, const void*>>& pairs,
                  const std::vector<int64_t>& numel, int64_t chunk, const Op& op,
                  cudaStream_t stream) {
  static_assert(sizeof(T) * N <= 16 && sizeof(S) * N <= 16, "vectors wider than 16 bytes");
  TensorTable table;
  table.count = 0;
  table.chunk_start[0] = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    const int32_t blocks = table.chunk_start[table.count];
    multi_tensor_kernel<T, S, N, Op><<<blocks, kThreads, 0, stream>>>(table, chunk, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
  };
  for (size_t i = 0; i < pairs.size(); ++i) {
    const int64_t chunks = (numel[i] + chunk - 1) / chunk;
    TORCH_CHECK(chunks < INT_MAX / 2, "minc_kernels::ema_update_: tensor too large (", numel[i], " elements)");
    if (table.count == kMaxTensors || table.chunk_start[table.count] + chunks >= INT_MAX / 2) flush();
    const int c = table.count;
    table.dst[c] = pairs[i].first;
    table.src[c] = pairs[i].second;
    table.numel[c] = numel[i];
    table.aligned[c] = reinterpret_cast<uintptr_t>(pairs[i].first) % (sizeof(T) * N) == 0 &&
                       reinterpret_cast<uintptr_t>(pairs[i].second) % (sizeof(S) * N) == 0;
    table.chunk_start[c + 1] = table.chunk_start[c] + static_cast<int32_t>(chunks);
    table.count = c + 1;
  }
  flush();
}

}  // namespace

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

// The CUDA kernels proper, called by the CUDA entry points in ema.cpp only after
// check_ema_args passed (so every tensor here is a CUDA tensor of one device with a checked
// layout).  The entry points, their checks and the op registration live in ema.cpp,
// compiled by the host compiler: every argument error is raised there, before this file's
// code runs.
void run_cuda(at::TensorList target, at::TensorList online, const EmaMomentum& momentum,
              at::TensorList copy_target, at::TensorList copy_source) {
  const at::Tensor& any = !target.empty() ? target[0] : (!copy_target.empty() ? copy_target[0] : at::Tensor());
  if (!any.defined()) return;
  const c10::cuda::CUDAGuard guard(any.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(any.device().index()).stream();

  // Lerp pairs grouped by (target dtype, online dtype), in call order within a group.
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i].numel() == 0) continue;
    groups[{static_cast<int>(target[i].scalar_type()), static_cast<int>(online[i].scalar_type())}]
        .push_back(i);
  }
  for (const auto& [key, idx] : groups) {
    std::vector<std::pair<void*, const void*>> pairs;
    std::vector<int64_t> numel;
    for (size_t i : idx) {
      pairs.emplace_back(target[i].data_ptr(), online[i].data_ptr());
      numel.push_back(target[i].numel());
    }
    const auto ttype = static_cast<at::ScalarType>(key.first);
    const auto stype = static_cast<at::ScalarType>(key.second);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ttype, "ema_update_cuda", [&] {
      using target_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, stype, "ema_update_cuda", [&] {
        using online_t = scalar_t;
        using acc_t = at::opmath_type<target_t>;
        constexpr int widest = sizeof(target_t) > sizeof(online_t) ? sizeof(target_t) : sizeof(online_t);
        constexpr int N = 16 / widest;
        LerpOp<acc_t> op{static_cast<acc_t>(1.0 - momentum.value)};
        op.momentum_ptr = momentum.device_ptr;
        op.momentum_double = momentum.device_double;
        launch_pairs<target_t, online_t, N>(pairs, numel, /*chunk=*/16384, op, stream);
      });
    });
  }

  // Copy pairs: raw bytes.
  std::vector<std::pair<void*, const void*>> pairs;
  std::vector<int64_t> nbytes;
  for (size_t i = 0; i < copy_target.size(); ++i) {
    const int64_t n = copy_target[i].numel() * static_cast<int64_t>(copy_target[i].element_size());
    if (n == 0) continue;
    pairs.emplace_back(copy_target[i].data_ptr(), copy_source[i].data_ptr());
    nbytes.push_back(n);
  }
  if (!pairs.empty()) launch_pairs<uint8_t, uint8_t, 16>(pairs, nbytes, /*chunk=*/65536, CopyOp{}, stream);
}

}  // namespace minc_kernels
