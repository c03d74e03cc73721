// Device code shared by the CUDA single-tensor ops (ops.cu) and tensor-list ops
// (list_ops.cu): loads and conversions, the fixed-order block reduction, and the bodies of
// the reduction and update kernels, each written for one block of a (possibly virtual)
// grid so that a list element is processed exactly as the single op processes that tensor.
// Design notes (determinism, fp64 accumulation, bandwidth) are at the top of ops.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
// c10 headers only (no ATen/cuda/CUDAContext.h): that header drags in cuBLAS/cuSPARSE
// headers, which a bare nvcc toolkit may not ship, and we need neither.
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream aliases.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace elra::cuda {
namespace {

constexpr int kThreads = 256;           // threads per block (8 warps)
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
// Reduction grid cap: enough blocks to fill any current GPU several times over (H200: 132
// SMs), few enough that the finishing block's pass over the slots is trivial.
constexpr int64_t kMaxReduceBlocks = 1024;
// Element-wise kernels: grid-stride with this many blocks per SM.
constexpr int kBlocksPerSm = 8;
constexpr int kVecBytes = 16;  // 128-bit loads/stores of the widest vector

// Elements per vector step: 16 bytes of the x / grad type T (4 floats or 8 bf16/fp16).
// A compact bfloat16 state (S != T) is loaded with the same element count, i.e. in
// narrower packs (4 bf16 = 8 bytes next to 4 floats), so every tensor is aligned to its
// own pack size (aligned_pack), not to one 16-byte assumption.
template <typename T>
constexpr int kPackN = kVecBytes / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// A value stored as T, re-stored as the state type S: a bit copy when S == T, otherwise
// T -> fp32 (exact) -> S with c10's conversion (bf16: round to nearest even, the same
// device conversion torch's own .to(torch.bfloat16) uses, so the bits match).
template <typename T, typename S>
__device__ __forceinline__ S to_state(T v) {
  if constexpr (std::is_same_v<T, S>) {
    return v;
  } else {
    return static_cast<S>(to_f(v));
  }
}

// See recover_diff in cpu/kernels.h: (x_prev - x) + (decay - 1) * x_prev keeps the small
// difference exact where decay * x_prev - x would round away most of it in fp32.
__device__ __forceinline__ float recover_diff(float xp, float x, float decay_m1) {
  return (xp - x) + decay_m1 * xp;
}

// The recover-mode retrace point x + back * dir, formed from the nearer end (see
// retrace_range in cpu/kernels.h): back = 1 returns to decay * x_prev exactly.
__device__ __forceinline__ float retrace_point(float xp, float x, float decay_m1, float back,
                                               float remain) {
  const float dir = recover_diff(xp, x, decay_m1);
  return back < 0.5f ? x + back * dir : (xp + decay_m1 * xp) - remain * dir;
}

// True when p (holding elements of E) may be read in packs of kPackN<T> elements of E.
template <typename T, typename E>
bool aligned_pack(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(E) * kPackN<T>) == 0;
}

// Sum over the block; valid in thread 0. Fixed shuffle tree => deterministic.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kWarps) ? smem[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  }
  __syncthreads();  // smem may be reused by the caller's next block_sum
  return v;
}

template <typename T>
__device__ __forceinline__ double to_d(T v) {
  return static_cast<double>(to_f(v));  // exact: T -> fp32 -> fp64
}

// G_prev_i as a double, either loaded (standard) or recovered from the two points in fp64
// (recover mode: (decay * x_prev - x) * inv_alpha, the reference's expression; in fp64 the
// difference of close points keeps ~1e-16 * |x|, so no recover_diff rewrite is needed).
// S: storage type of a / b (standard mode: grad's type or bfloat16; recover: x's type).
// N: elements per pack (kPackN of grad's type).
template <typename S, int N, bool kRecover>
struct GPrevSrc {
  const S* __restrict__ a;  // standard: grad_prev; recover: x_prev
  const S* __restrict__ b;  // recover: x (unused in standard mode)
  double decay;
  double inv_alpha;
  __device__ __forceinline__ double at(int64_t i) const {
    if constexpr (kRecover) {
      return (decay * to_d(a[i]) - to_d(b[i])) * inv_alpha;
    } else {
      return to_d(a[i]);
    }
  }
  __device__ __forceinline__ void at_pack(int64_t k, double* out) const {
    using P = Pack<S, N>;
    const P pa = reinterpret_cast<const P*>(a)[k];
    if constexpr (kRecover) {
      const P pb = reinterpret_cast<const P*>(b)[k];
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = (decay * to_d(pa.v[j]) - to_d(pb.v[j])) * inv_alpha;
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = to_d(pa.v[j]);
    }
  }
};

// s + a * b where the fp64 product of a and b is exact (both widened from fp32 / bf16 /
// fp16: 24 + 24 significand bits <= 53): one FMA gives the bits of multiply-then-add
// (the add is the only rounding either way) at half the fp64 instructions; --fmad=false
// leaves explicit fma() alone. A recovered G_prev is not such a value: its product is
// rounded before the sum, as in the reference.
__device__ __forceinline__ double exact_product_add(double a, double b, double s) {
  return fma(a, b, s);
}

// One block's share of a reduction: [sum g*g, sum gp*g] over the elements that block
// `block` of a grid of `nblocks` visits (grid-stride), valid in thread 0. The single-tensor
// kernel passes (blockIdx.x, gridDim.x); the list kernel (list_ops.cu) passes a table
// entry's virtual block of its tensor, so a list element's partials -- and hence its sum
// -- are bit-identical to the single op's on the same tensor.
template <typename T, typename S, bool kRecover>
__device__ __forceinline__ void dots_block_partial(const T* __restrict__ g,
                                                   const GPrevSrc<S, kPackN<T>, kRecover>& src,
                                                   int64_t n, bool vec_ok, int64_t block,
                                                   int64_t nblocks, double* __restrict__ slot) {
  constexpr int kN = kPackN<T>;
  using P = Pack<T, kN>;
  const int64_t tid = block * blockDim.x + threadIdx.x;
  const int64_t stride = nblocks * blockDim.x;
  double s_gg = 0.0;
  double s_gpg = 0.0;
  int64_t scalar_begin = 0;
  if (vec_ok) {
    const int64_t n_vec = n / kN;
    for (int64_t k = tid; k < n_vec; k += stride) {
      const P pg = reinterpret_cast<const P*>(g)[k];
      double gp[kN];
      src.at_pack(k, gp);
#pragma unroll
      for (int j = 0; j < kN; ++j) {  // fp64 products and sums, in element order
        const double gj = to_d(pg.v[j]);
        s_gg = exact_product_add(gj, gj, s_gg);
        s_gpg = kRecover ? s_gpg + gp[j] * gj : exact_product_add(gp[j], gj, s_gpg);
      }
    }
    scalar_begin = n_vec * kN;
  }
  for (int64_t i = scalar_begin + tid; i < n; i += stride) {  // tail (or unaligned input)
    const double gi = to_d(g[i]);
    s_gg = exact_product_add(gi, gi, s_gg);
    s_gpg = kRecover ? s_gpg + src.at(i) * gi : exact_product_add(src.at(i), gi, s_gpg);
  }
  __shared__ double smem[kWarps];
  s_gg = block_sum(s_gg, smem);
  s_gpg = block_sum(s_gpg, smem);
  if (threadIdx.x == 0) {
    slot[0] = s_gg;
    slot[1] = s_gpg;
  }
}

// Stage 1: partials[2 * block + {0,1}] = block's [sum g*g, sum gp*g].
template <typename T, typename S, bool kRecover>
__global__ void __launch_bounds__(kThreads)
    dots_partial_kernel(const T* __restrict__ g, GPrevSrc<S, kPackN<T>, kRecover> src,
                        const double* __restrict__ coeffs, int64_t n, bool vec_ok,
                        double* __restrict__ partials) {
  if constexpr (kRecover) {  // coefficients read on device, once per thread
    src.decay = coeffs[kRCoefDecay];
    src.inv_alpha = coeffs[kRCoefInvAlphaPrev];
  }
  dots_block_partial<T, S, kRecover>(g, src, n, vec_ok, blockIdx.x, gridDim.x,
                                     partials + 2 * static_cast<int64_t>(blockIdx.x));
}

// The sums of `nblocks` partial slots in a fixed order (thread-strided, then the block's
// shuffle tree), valid in thread 0: the same order for a single tensor and a list element.
__device__ __forceinline__ void dots_finish_block(const double* __restrict__ partials,
                                                  int64_t nblocks, double* sums) {
  double s_gg = 0.0;
  double s_gpg = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += blockDim.x) {
    s_gg += partials[2 * b];
    s_gpg += partials[2 * b + 1];
  }
  __shared__ double smem[kWarps];
  sums[0] = block_sum(s_gg, smem);
  sums[1] = block_sum(s_gpg, smem);
}

// Stage 2: one block sums the partial slots in a fixed order into out[0..1].
__global__ void __launch_bounds__(kThreads)
    dots_finish_kernel(const double* __restrict__ partials, int64_t nblocks,
                       double* __restrict__ out) {
  double sums[2];
  dots_finish_block(partials, nblocks, sums);
  if (threadIdx.x == 0) {
    out[0] = sums[0];
    out[1] = sums[1];
  }
}

// Element-wise update: update_, update_recover_ (kRecover) and update_swap_ (kSwap) in one
// body (UpdateOp in common.h), run by block `block` of a grid of `nblocks` (grid-stride;
// every element's result is independent of the grid). other = grad_prev (standard, swap)
// or x_prev (recover), stored as S (T, or bfloat16 for a compact grad_prev). Accept:
// x <- decay * x - step * g and other <- g (standard) or x (recover); swap mode writes only
// x (the caller swaps the roles of grad and grad_prev). Retrace: x <- x + back * grad_prev
// (swap mode also writes g <- grad_prev, a bit copy), or in recover mode the same point
// along the recovered direction, formed from the nearer end (retrace_point: a full return
// is exact). `accept` is uniform across the grid, so the branch does not diverge; on a
// retrace `g` is never loaded, so a non-finite gradient cannot reach x. No product is
// contracted into an FMA (nvcc --fmad=false, setup.py), so every element rounds as on the
// CPU (-ffp-contract=off) and as torch's own x.float() * a - b * c.
template <typename T, typename S, bool kRecover, bool kSwap>
__device__ __forceinline__ void update_block(T* __restrict__ x,
                                             UpdateGradPtr<T, kSwap> __restrict__ g,
                                             UpdateOtherPtr<S, kSwap> __restrict__ other,
                                             const double* __restrict__ coeffs, int64_t n,
                                             bool vec_ok, int64_t block, int64_t nblocks) {
  static_assert(!kRecover || std::is_same_v<T, S>, "x_prev is a point: stored like x");
  static_assert(!kSwap || std::is_same_v<T, S>, "swap mode: grad and grad_prev trade roles");
  constexpr int kN = kPackN<T>;
  using P = Pack<T, kN>;
  using PS = Pack<S, kN>;
  const bool accept = coeffs[kCoefAccept] != 0.0;
  const float decay = static_cast<float>(coeffs[kCoefDecay]);
  const float step = static_cast<float>(coeffs[kCoefStep]);
  const float back = static_cast<float>(coeffs[kCoefBack]);
  const float decay_m1 = static_cast<float>(coeffs[kCoefDecay] - 1.0);
  const float remain = static_cast<float>(1.0 - coeffs[kCoefBack]);
  const int64_t tid = block * blockDim.x + threadIdx.x;
  const int64_t stride = nblocks * blockDim.x;
  int64_t scalar_begin = 0;
  if (vec_ok) {
    const int64_t n_vec = n / kN;
    P* xv = reinterpret_cast<P*>(x);
    const auto gv = reinterpret_cast<UpdateGradPtr<P, kSwap>>(g);
    const auto ov = reinterpret_cast<UpdateOtherPtr<PS, kSwap>>(other);
    if (accept) {
      for (int64_t k = tid; k < n_vec; k += stride) {
        const P px = xv[k];
        const P pg = gv[k];
        P nx;
        [[maybe_unused]] PS no;
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          nx.v[j] = static_cast<T>(decay * to_f(px.v[j]) - step * to_f(pg.v[j]));
          if constexpr (!kSwap) no.v[j] = to_state<T, S>(kRecover ? px.v[j] : pg.v[j]);
        }
        if constexpr (!kSwap) ov[k] = no;
        xv[k] = nx;
      }
    } else {
      for (int64_t k = tid; k < n_vec; k += stride) {
        const P px = xv[k];
        const PS po = ov[k];
        P nx;
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          const float xj = to_f(px.v[j]);
          const float oj = to_f(po.v[j]);
          nx.v[j] = static_cast<T>(kRecover ? retrace_point(oj, xj, decay_m1, back, remain)
                                            : xj + back * oj);
        }
        if constexpr (kSwap) gv[k] = po;
        xv[k] = nx;
      }
    }
    scalar_begin = n_vec * kN;
  }
  for (int64_t i = scalar_begin + tid; i < n; i += stride) {  // tail (or unaligned input)
    const T xi = x[i];
    const float xf = to_f(xi);
    if (accept) {
      const T gi = g[i];
      if constexpr (!kSwap) other[i] = to_state<T, S>(kRecover ? xi : gi);
      x[i] = static_cast<T>(decay * xf - step * to_f(gi));
    } else {
      const S oi = other[i];
      if constexpr (kSwap) g[i] = oi;
      const float of = to_f(oi);
      x[i] = static_cast<T>(kRecover ? retrace_point(of, xf, decay_m1, back, remain)
                                     : xf + back * of);
    }
  }
}

template <typename T, typename S, bool kRecover, bool kSwap>
__global__ void __launch_bounds__(kThreads)
    update_kernel(T* __restrict__ x, UpdateGradPtr<T, kSwap> __restrict__ g,
                  UpdateOtherPtr<S, kSwap> __restrict__ other,
                  const double* __restrict__ coeffs, int64_t n, bool vec_ok) {
  update_block<T, S, kRecover, kSwap>(x, g, other, coeffs, n, vec_ok, blockIdx.x, gridDim.x);
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of the reduction: a function of n and the pack width only (determinism).
template <typename T>
int64_t reduce_blocks(int64_t n) {
  const int64_t work = ceil_div(n, kPackN<T>);
  return std::clamp<int64_t>(ceil_div(work, kThreads), 1, kMaxReduceBlocks);
}

// Blocks an element-wise kernel needs at most on the current device: kBlocksPerSm per SM.
inline int64_t elementwise_block_cap() {
  int sms = 0;  // cheap attribute query, no synchronisation
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return static_cast<int64_t>(sms) * kBlocksPerSm;
}

template <typename T>
int64_t elementwise_blocks(int64_t n, int64_t cap = elementwise_block_cap()) {
  const int64_t work = ceil_div(n, kPackN<T>);
  return std::clamp<int64_t>(ceil_div(work, kThreads), 1, cap);
}

// Stage 1 of a reduction over g (reduce_blocks<T>(n) blocks) into partials[0, 2 * blocks):
// the single op's own buffer, or a list element's slots in the list's buffer.
template <typename T, typename S, bool kRecover>
void launch_dots_partials(const T* g, GPrevSrc<S, kPackN<T>, kRecover> src,
                          const double* coeffs, int64_t n, bool vec_ok, double* partials,
                          cudaStream_t stream) {
  const int64_t blocks = reduce_blocks<T>(n);
  dots_partial_kernel<T, S, kRecover><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      g, src, coeffs, n, vec_ok, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S, bool kRecover>
void launch_dots(const at::Tensor& g, GPrevSrc<S, kPackN<T>, kRecover> src,
                 const double* coeffs, bool vec_ok, const at::Tensor& out) {
  const int64_t n = g.numel();
  const int64_t blocks = reduce_blocks<T>(n);
  at::Tensor partials = at::empty({2 * blocks}, out.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_dots_partials<T, S, kRecover>(g.const_data_ptr<T>(), src, coeffs, n, vec_ok,
                                       partials.data_ptr<double>(), stream);
  dots_finish_kernel<<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks,
                                                   out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One update over n > 0 elements on the current stream (the pointers' alignment decides
// the vector path).
template <typename T, typename S, bool kRecover, bool kSwap>
void launch_update(T* x, UpdateGradPtr<T, kSwap> g, UpdateOtherPtr<S, kSwap> other,
                   const double* coeffs, int64_t n, cudaStream_t stream) {
  const bool vec_ok = aligned_pack<T, T>(x) && aligned_pack<T, T>(g) && aligned_pack<T, S>(other);
  const int64_t blocks = elementwise_blocks<T>(n);
  update_kernel<T, S, kRecover, kSwap><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x, g, other, coeffs, n, vec_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace elra::cuda
