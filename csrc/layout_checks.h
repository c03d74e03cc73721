// Host-side checks of the per-parameter layout (see layout_checks.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace elra {

// What the step does with a plain parameter.
constexpr uint8_t kPlainFrozen = 0;   // no gradient, no G_{t-1}: nothing
constexpr uint8_t kPlainStepped = 1;  // a gradient and a G_{t-1} the step takes as they are
constexpr uint8_t kPlainSkipped = 2;  // no gradient now but a G_{t-1}: finish's fix-up

struct PlainListStep {
  // The first parameter the plain path cannot take (-1: every one is plain).
  int64_t first_not_plain;
  // Per parameter: one of the kPlain* kinds (valid when first_not_plain is -1).
  std::vector<uint8_t> kinds;
};

// params[i] with its gradient (None when it has none), its G_{t-1} (None before the first
// step that gave it one) and the version of G_{t-1} recorded by the last step (-1: none).
// state_dtype: the compact G_{t-1} dtype, if any; supported: the dtypes the backend's
// kernels take, unless any_dtype (the reference backend takes any float dtype).
PlainListStep plain_list_step(const std::vector<at::Tensor>& params,
                              const std::vector<std::optional<at::Tensor>>& grads,
                              const std::vector<std::optional<at::Tensor>>& prevs,
                              const std::vector<int64_t>& versions,
                              std::optional<at::ScalarType> state_dtype,
                              const std::vector<at::ScalarType>& supported, bool any_dtype);

}  // namespace elra
