// The `elra_fused._C` Python module and the registration of every op implementation.
//
// Importing the module runs the two TORCH_LIBRARY_IMPL blocks below, which register the
// CPU table (cpu/) and, when compiled in, the CUDA table (cuda/) under the op names. The
// schemas are defined in Python (the package elra_fused/ops, torch.library.define); this
// library only registers implementations. Loading it before or after that definition is
// fine: the dispatcher accepts an implementation for a not-yet-defined operator and binds
// it once the schema appears.

#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/kernels.h"
#include "layout_checks.h"

namespace elra {
namespace {

// One device's implementations, each under its op name.
void register_impls(torch::Library& m, const SingleImpls& single, const ListImpls& lists) {
  m.impl("dots", single.dots);
  m.impl("dots_recover", single.dots_recover);
  m.impl("update_", single.update_);
  m.impl("update_recover_", single.update_recover_);
  m.impl("update_swap_", single.update_swap_);
  m.impl("dots_list", lists.dots_list);
  m.impl("update_list_", lists.update_list_);
  m.impl("update_swap_list_", lists.update_swap_list_);
}

// Set by setup.py when the CUDA sources (cuda/) are compiled in.
#ifdef ELRA_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
#endif

}  // namespace
}  // namespace elra

TORCH_LIBRARY_IMPL(elra_fused, CPU, m) {
  elra::register_impls(m, elra::cpu::single_impls(), elra::cpu::list_impls());
}

#ifdef ELRA_WITH_CUDA
TORCH_LIBRARY_IMPL(elra_fused, CUDA, m) {
  elra::register_impls(m, elra::cuda::single_impls(), elra::cuda::list_impls());
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elra_fused C++/CUDA kernels; importing registers the elra_fused ops.";
  m.def("cuda_compiled", [] { return elra::kCudaCompiled; },
        "True when the CUDA kernels were compiled into this build.");
  m.def("chunk_elems", [] { return elra::cpu::kChunk; },
        "Fixed CPU reduction chunk (elements); results do not depend on thread count.");
  m.def(
      "cpu_vector_isa",
      [] {
#if ELRA_CPU_AVX2_DISPATCH
        return elra::cpu::cpu_has_avx2() ? "avx2" : "baseline";
#else
        return "baseline";
#endif
      },
      "The CPU loops in use: 'avx2' (runtime dispatch) or 'baseline' (the build's own).");
  m.def(
      "plain_list_step",
      [](const std::vector<at::Tensor>& params,
         const std::vector<std::optional<at::Tensor>>& grads,
         const std::vector<std::optional<at::Tensor>>& prevs, const std::vector<int64_t>& versions,
         std::optional<at::ScalarType> state_dtype, const std::vector<at::ScalarType>& supported,
         bool any_dtype) {
        const elra::PlainListStep r = elra::plain_list_step(params, grads, prevs, versions,
                                                            state_dtype, supported, any_dtype);
        return std::make_pair(r.first_not_plain, r.kinds);
      },
      "The per-parameter layout's step checks in one call (layout_checks.cpp): (index of the "
      "first parameter that is not plain or -1, per parameter: 0 frozen, 1 stepped, "
      "2 skipped).");
}
