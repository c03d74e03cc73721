// CUDA kernels of the ELRA vector passes (semantics: elra_fused/reference_ops.py): the
// single-tensor ops dots, dots_recover and update_ / update_recover_ / update_swap_ (one
// update kernel with compile-time flags), and the CUDA table of implementations that
// module.cpp registers. The kernels are in kernels.cuh, shared with the multi-tensor list
// ops (list_ops.cu).
//
// Pattern (as in apex's multi_tensor_l2norm / fused LAMB): reductions write one fp64
// partial per block into a fixed slot, then a single finishing block sums the slots in a
// fixed order. The grid size depends only on n and the dtype (capped by kMaxReduceBlocks,
// not by the device's SM count), so results are bit-identical across runs and devices.
// No float atomics. Coefficients are read by the kernels from device memory; nothing is
// copied to the host, so the ops never synchronise the stream.
//
// The reductions widen every element to fp64 and form products and sums in fp64 (as the
// float64 reference): a product of two fp32 / bf16 / fp16 values is exact in fp64, so
// nothing overflows or underflows over the whole finite fp32 range. At HBM bandwidth this
// stays memory bound on A100 / H100 / H200-class GPUs: fp64 FMA (exact products only,
// exact_product_add in kernels.cuh) runs at half the fp32 rate, and the fp32 -> fp64 conversions (16
// per clock per SM; 2 per element, 3 in recover mode) need ~30% of that rate for fp32
// inputs at 4.8 TB/s, ~60% for 2-byte inputs. GPUs with slow fp64 (1/64 rate, consumer parts) may become compute bound here.

#include "kernels.cuh"

namespace elra::cuda {
namespace {

at::Tensor dots_cuda(const at::Tensor& grad, const at::Tensor& grad_prev) {
  check_dots(grad, grad_prev);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots", [&] {
    dispatch_state_type<scalar_t>(grad_prev.scalar_type(), [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
      const bool vec_ok = aligned_pack<scalar_t, scalar_t>(grad.const_data_ptr()) &&
                          aligned_pack<scalar_t, S>(grad_prev.const_data_ptr());
      const GPrevSrc<S, kPackN<scalar_t>, false> src{grad_prev.const_data_ptr<S>(), nullptr,
                                                     0.0, 0.0};
      launch_dots<scalar_t, S, false>(grad, src, nullptr, vec_ok, out);
    });
  });
  return out;
}

at::Tensor dots_recover_cuda(const at::Tensor& x_prev, const at::Tensor& x,
                             const at::Tensor& grad, const at::Tensor& coeffs) {
  check_dots_recover(x_prev, x, grad, coeffs);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots_recover", [&] {
    const bool vec_ok = aligned_pack<scalar_t, scalar_t>(grad.const_data_ptr()) &&
                        aligned_pack<scalar_t, scalar_t>(x_prev.const_data_ptr()) &&
                        aligned_pack<scalar_t, scalar_t>(x.const_data_ptr());
    // decay / inv_alpha are filled in by the kernel from `coeffs` (device memory).
    const GPrevSrc<scalar_t, kPackN<scalar_t>, true> src{x_prev.const_data_ptr<scalar_t>(),
                                                         x.const_data_ptr<scalar_t>(), 0.0, 0.0};
    launch_dots<scalar_t, scalar_t, true>(grad, src, coeffs.const_data_ptr<double>(), vec_ok,
                                          out);
  });
  return out;
}

// update_, update_recover_ and update_swap_ (UpdateOp in common.h).
template <bool kRecover, bool kSwap>
void update_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& other,
                 const at::Tensor& coeffs) {
  check_update_op<kRecover, kSwap>(x, grad, other, coeffs);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_update<kRecover, kSwap>(x, grad, other, [&](auto* x_data, auto* g, auto* o) {
    using T = std::remove_pointer_t<decltype(x_data)>;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(o)>>;
    launch_update<T, S, kRecover, kSwap>(x_data, g, o, coeffs.const_data_ptr<double>(), n,
                                         stream);
  });
}

}  // namespace

SingleImpls single_impls() {
  return {&dots_cuda, &dots_recover_cuda, &update_cuda<false, false>, &update_cuda<true, false>,
          &update_cuda<false, true>};
}

}  // namespace elra::cuda
