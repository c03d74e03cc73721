// CUDA implementations of the tensor-list ops dots_list / update_list_ / update_swap_list_
// (semantics: elra_fused/ops, "Tensor lists"). The CPU ones are native OpenMP kernels in
// cpu/list_ops.cpp (one parallel region over the chunks of all tensors).
//
// On CUDA each element goes to the single-tensor op, found through the dispatcher, so the
// CUDA kernels are reused unchanged: one launch per tensor and pass (the flat layout, the
// CUDA default, makes it one launch per pass). Every element is validated before the
// first is touched (all-or-nothing), and dots_list adds the per-tensor fp64 results in
// list order, one addition after another -- as the CPU kernels and the Python
// (reference, triton) implementations do.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../common.h"

namespace elra::cuda {
namespace {

using DotsFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using UpdateFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

// The single-tensor op, looked up once (its schema is defined by the Python package
// elra_fused/ops before any list op can be called).
template <typename Fn>
c10::TypedOperatorHandle<Fn> single_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

at::Tensor dots_list_cuda(at::TensorList grad, at::TensorList grad_prev) {
  static const auto dots = single_op<DotsFn>("elra_fused::dots");
  const DotsLists lists = checked_dots_lists(grad, grad_prev, /*flatten=*/true);
  at::Tensor total = dots.call(lists.grad[0], lists.grad_prev[0]);
  for (size_t i = 1; i < lists.grad.size(); ++i) {
    total.add_(dots.call(lists.grad[i], lists.grad_prev[i]));
  }
  return total;
}

// update_list_ / update_swap_list_ (kSwap; UpdateOp in common.h): validate every element,
// then the single op on each.
template <bool kSwap>
void update_list_cuda(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                      const at::Tensor& coeffs) {
  using Op = UpdateOp</*kRecover=*/false, kSwap>;
  static const auto single = single_op<UpdateFn>(Op::kQualifiedName);
  const UpdateLists lists = checked_update_lists(Op::kListName, x, grad, grad_prev, coeffs,
                                                 Op::kCompactState, /*flatten=*/true);
  for (size_t i = 0; i < lists.x.size(); ++i) {
    single.call(lists.x[i], lists.grad[i], lists.grad_prev[i], coeffs);
  }
}

}  // namespace

ListImpls list_impls() {
  return {&dots_list_cuda, &update_list_cuda</*kSwap=*/false>, &update_list_cuda</*kSwap=*/true>};
}

}  // namespace elra::cuda
