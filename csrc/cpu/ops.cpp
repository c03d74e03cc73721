// The single-tensor CPU ops (dots, dots_recover, update_, update_recover_, update_swap_):
// validation, dtype dispatch and the OpenMP kernels of cpu/kernels.h; and the CPU table of
// implementations that module.cpp registers.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"
#include "kernels.h"

namespace elra::cpu {
namespace {

at::Tensor dots_cpu(const at::Tensor& grad, const at::Tensor& grad_prev) {
  check_dots(grad, grad_prev);
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  const int64_t n = grad.numel();
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots", [&] {
    dispatch_state_type<scalar_t>(grad_prev.scalar_type(), [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const S* gp = grad_prev.const_data_ptr<S>();
      reduce_chunks(
          n,
          [g, gp](int64_t begin, int64_t end, double* slot) {
            dots_chunk_stored(g, gp, begin, end, slot);
          },
          out.data_ptr<double>());
    });
  });
  return out;
}

// dots_recover's chunk: the float32 intrinsics where the CPU has AVX2 and FMA, else the
// generic loop over `gprev` (the same G_{t-1} expression, element by element).
template <typename T, typename GPrev>
void dots_chunk_recover(const T* g, const T* x_prev, const T* x, double decay,
                        double inv_alpha, GPrev gprev, int64_t begin, int64_t end,
                        double* slot) {
#if ELRA_CPU_AVX2_DISPATCH
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) {
      dots_chunk_f32_avx2<true>(g, x_prev, x, decay, inv_alpha, begin, end, slot);
      return;
    }
  }
#endif
  dots_chunk(g, begin, end, gprev, slot);
}

at::Tensor dots_recover_cpu(const at::Tensor& x_prev, const at::Tensor& x,
                            const at::Tensor& grad, const at::Tensor& coeffs) {
  check_dots_recover(x_prev, x, grad, coeffs);
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  const double* c = coeffs.const_data_ptr<double>();
  const double decay = c[kRCoefDecay];
  const double inv_alpha = c[kRCoefInvAlphaPrev];
  const int64_t n = grad.numel();
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots_recover", [&] {
    using C = Codec<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* x_prev_data = x_prev.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const auto* xp = raw_ptr(x_prev_data);
    const auto* xc = raw_ptr(x_data);
    // G_prev_i = (decay * x_prev_i - x_i) * inv_alpha, the reference's fp64 expression
    // (in fp64 the difference of close points keeps ~1e-16 * |x|, so the fp32 update
    // kernels' recover_diff rewrite is not needed here).
    const auto gprev = [xp, xc, decay, inv_alpha](int64_t i) {
      const double xpi = C::load(xp[i]);
      const double xi = C::load(xc[i]);
      return (decay * xpi - xi) * inv_alpha;
    };
    reduce_chunks(
        n,
        [=](int64_t begin, int64_t end, double* slot) {
          dots_chunk_recover(g, x_prev_data, x_data, decay, inv_alpha, gprev, begin, end, slot);
        },
        out.data_ptr<double>());
  });
  return out;
}

// update_, update_recover_ and update_swap_ (UpdateOp in common.h).
template <bool kRecover, bool kSwap>
void update_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& other,
                const at::Tensor& coeffs) {
  check_update_op<kRecover, kSwap>(x, grad, other, coeffs);
  const UpdateCoeffs k = load_update_coeffs(coeffs, x.numel());
  dispatch_update<kRecover, kSwap>(x, grad, other, [&](auto* x_data, auto* g, auto* o) {
    using T = std::remove_pointer_t<decltype(x_data)>;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(o)>>;
    update_typed<T, S, kRecover, kSwap>(x_data, g, o, k, x.numel());
  });
}

}  // namespace

SingleImpls single_impls() {
  return {&dots_cpu, &dots_recover_cpu, &update_cpu<false, false>, &update_cpu<true, false>,
          &update_cpu<false, true>};
}

}  // namespace elra::cpu
