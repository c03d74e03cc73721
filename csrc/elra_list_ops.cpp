// Tensor-list forms of dots / update_ / update_swap_ for the per-parameter layout
// (semantics: elra_fused/ops.py, "Tensor lists"), registered for CPU and, when the CUDA
// kernels are compiled in, for CUDA.
//
// Each list element is one parameter's tensor: contiguous, any shape. The loop lives here,
// not in Python, because a model has hundreds of parameter tensors and a Python-level call
// per tensor per pass costs ~10 us each; here it is one dispatcher call per tensor
// (~1 us). The per-tensor work is the single-tensor op itself (found through the
// dispatcher, so the CPU and CUDA kernels and their validation are reused unchanged).
//
// All-or-nothing: every element is validated (the single ops' own checks, from
// elra_common.h) before the first one is touched, so a bad element leaves the others
// unchanged.
//
// Determinism: dots_list adds the per-tensor fp64 results in list order, one addition
// after another -- the same order the Python (reference, triton) implementations use.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "elra_common.h"

namespace elra {
namespace {

using DotsFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using UpdateFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The single-tensor op, looked up once (its schema is defined by elra_fused/ops.py before
// any list op can be called).
template <typename Fn>
c10::TypedOperatorHandle<Fn> single_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void check_lists(const char* op, at::TensorList a, const char* a_name, at::TensorList b,
                 const char* b_name) {
  TORCH_CHECK_VALUE(!a.empty(), "elra_fused.", op, ": ", a_name,
                    " is empty; pass at least one tensor");
  TORCH_CHECK_VALUE(a.size() == b.size(), "elra_fused.", op, ": ", a_name, " has ", a.size(),
                    " tensors but ", b_name, " has ", b.size());
}

// Element i of a list as the 1-D vector the single-tensor ops take. Contiguity is checked
// here with the list's own message; view(-1) never copies, so in-place ops stay in place.
at::Tensor flat_element(const at::Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "elra_fused.", op, ": ", name, "[", i,
                    "] must be contiguous");
  return t.view({-1});
}

// Runs `check` and names the list element in the error it raises.
template <typename Check>
void check_element(size_t i, const Check& check) {
  try {
    check();
  } catch (c10::Error& e) {
    e.add_context("in list element " + std::to_string(i));
    throw;
  }
}

at::Tensor dots_list(at::TensorList grad, at::TensorList grad_prev) {
  check_lists("dots_list", grad, "grad", grad_prev, "grad_prev");
  static const auto dots = single_op<DotsFn>("elra_fused::dots");
  std::vector<at::Tensor> g(grad.size()), gp(grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    g[i] = flat_element(grad[i], "dots_list", "grad", i);
    gp[i] = flat_element(grad_prev[i], "dots_list", "grad_prev", i);
    check_element(i, [&] { check_dots(g[i], gp[i]); });
  }
  at::Tensor total;
  for (size_t i = 0; i < g.size(); ++i) {
    at::Tensor part = dots.call(g[i], gp[i]);
    if (i == 0) {
      total = part;
    } else {
      total.add_(part);
    }
  }
  return total;
}

// `single_name` is the op whose checks apply per element (update_ allows a compact
// bfloat16 grad_prev, update_swap_ does not).
void update_lists(const char* op, const char* single_name,
                  const c10::TypedOperatorHandle<UpdateFn>& single, at::TensorList x,
                  at::TensorList grad, at::TensorList grad_prev, const at::Tensor& coeffs) {
  check_lists(op, x, "x", grad, "grad");
  check_lists(op, x, "x", grad_prev, "grad_prev");
  const bool allow_bf16_state = std::string(single_name) == "update_";
  std::vector<at::Tensor> xs(x.size()), gs(x.size()), gps(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    xs[i] = flat_element(x[i], op, "x", i);
    gs[i] = flat_element(grad[i], op, "grad", i);
    gps[i] = flat_element(grad_prev[i], op, "grad_prev", i);
    check_element(i, [&] {
      check_update(op, xs[i], gs[i], gps[i], "grad_prev", coeffs, allow_bf16_state);
    });
  }
  for (size_t i = 0; i < xs.size(); ++i) {
    single.call(xs[i], gs[i], gps[i], coeffs);
  }
}

void update_list(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                 const at::Tensor& coeffs) {
  static const auto single = single_op<UpdateFn>("elra_fused::update_");
  update_lists("update_list_", "update_", single, x, grad, grad_prev, coeffs);
}

void update_swap_list(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                      const at::Tensor& coeffs) {
  static const auto single = single_op<UpdateFn>("elra_fused::update_swap_");
  update_lists("update_swap_list_", "update_swap_", single, x, grad, grad_prev, coeffs);
}

}  // namespace
}  // namespace elra

TORCH_LIBRARY_IMPL(elra_fused, CPU, m) {
  m.impl("dots_list", &elra::dots_list);
  m.impl("update_list_", &elra::update_list);
  m.impl("update_swap_list_", &elra::update_swap_list);
}

#ifdef ELRA_WITH_CUDA
TORCH_LIBRARY_IMPL(elra_fused, CUDA, m) {
  m.impl("dots_list", &elra::dots_list);
  m.impl("update_list_", &elra::update_list);
  m.impl("update_swap_list_", &elra::update_swap_list);
}
#endif
