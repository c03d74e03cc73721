// The per-parameter layout's per-step checks (elra_fused/list_layout.py, ListLayout.gather)
// for the common case, over every parameter in one call: at a few hundred parameters the
// same checks in Python are most of a step's host time (~2-4 us per parameter: a dozen
// attribute reads and calls each), here ~0.1 us.
//
// This is a filter, not a second set of rules: it answers whether every parameter is in
// the plain state the Python loop would accept unchanged (no copy of a gradient, no fresh
// G_{t-1}, no error, no skipped parameter). If any is not, Python's own loop runs from the
// start and does what that parameter needs, with its error messages. Tensor subclasses
// (wrappers that answer in Python) never reach it: the caller declines them, and passes a
// sharded model (every parameter a DTensor) as its local shards. A parameter that had a
// gradient before and has none now (an unused head) is plain: the loop only lists it for
// the layout's finish.

#include "layout_checks.h"

#include <c10/core/Layout.h>

#include <algorithm>

namespace elra {

PlainListStep plain_list_step(const std::vector<at::Tensor>& params,
                              const std::vector<std::optional<at::Tensor>>& grads,
                              const std::vector<std::optional<at::Tensor>>& prevs,
                              const std::vector<int64_t>& versions,
                              std::optional<at::ScalarType> state_dtype,
                              const std::vector<at::ScalarType>& supported, bool any_dtype) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && prevs.size() == params.size() &&
                        versions.size() == params.size(),
                    "plain_list_step: the four lists must have one entry per parameter");
  PlainListStep out{-1, std::vector<uint8_t>(params.size(), kPlainFrozen)};
  const auto is_supported = [&](at::ScalarType t) {
    return any_dtype || std::find(supported.begin(), supported.end(), t) != supported.end();
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const std::optional<at::Tensor>& grad = grads[i];
    const std::optional<at::Tensor>& prev = prevs[i];
    const bool has_prev = prev.has_value() && prev->defined();
    const bool plain = [&] {
      // A G_{t-1} kept by reference and changed in place since the last step: an error.
      if (has_prev && versions[i] >= 0 && static_cast<int64_t>(prev->_version()) != versions[i]) {
        return false;
      }
      if (!grad.has_value() || !grad->defined()) {
        return true;  // frozen (no G_{t-1}) or skipped (the layout's finish fixes it up)
      }
      const at::Tensor& g = *grad;
      // Every parameter on the first one's device: one segment per wd.
      if (param.device() != params[0].device() || !param.is_contiguous()) return false;
      if (g.layout() != c10::kStrided || g.scalar_type() != param.scalar_type() ||
          c10::isComplexType(g.scalar_type()) || !is_supported(param.scalar_type()) ||
          g.sizes() != param.sizes() || g.device() != param.device() || !g.is_contiguous()) {
        return false;
      }
      if (!has_prev || prev->layout() != c10::kStrided || !prev->is_contiguous() ||
          prev->device() != param.device() || prev->numel() != param.numel() ||
          (prev->scalar_type() != param.scalar_type() && prev->scalar_type() != state_dtype)) {
        return false;
      }
      // A gradient in the parameter's own memory (w.grad = w.detach(), or a view of it):
      // the loop copies it.
      if (g.is_alias_of(param)) return false;
      // A second step without backward: the gradient is last step's G_{t-1} itself.
      // (Empty tensors all have a null address: nothing to keep apart; an FSDP2 rank
      // whose local shard of a parameter is empty stays on the one-call path.)
      return g.numel() == 0 || g.const_data_ptr() != prev->const_data_ptr();
    }();
    if (!plain) {
      out.first_not_plain = static_cast<int64_t>(i);
      return out;
    }
    if (grad.has_value() && grad->defined()) {
      out.kinds[i] = kPlainStepped;
    } else if (has_prev) {
      out.kinds[i] = kPlainSkipped;
    }
  }
  return out;
}

}  // namespace elra
