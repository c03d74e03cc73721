// Shared by the CPU (cpu/) and CUDA (cuda/) implementations: coefficient layouts, input
// validation, the compile-time description of the update ops (UpdateOp) and the tables of
// one device's implementations (SingleImpls, ListImpls) that module.cpp registers. The op schemas
// themselves live in ONE place, the Python package elra_fused/ops (schemas.py, defined
// with torch.library); this library only registers implementations.
//
// Validation messages mirror the Python validation (elra_fused/ops/validation.py) so
// that every backend raises the same ValueError / TypeError for the same user mistake.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// Dispatch over the three storage dtypes the kernels support (math is always fp32).
#define ELRA_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                            \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace elra {

// Indices into the update coefficient vector [accept, decay, step, back]
// (elra_fused/reference_ops.py: COEF_*).
constexpr int64_t kCoefAccept = 0;
constexpr int64_t kCoefDecay = 1;
constexpr int64_t kCoefStep = 2;
constexpr int64_t kCoefBack = 3;
constexpr int64_t kUpdateCoeffsLen = 4;
// Indices into the dots_recover coefficient vector [decay, inv_alpha_prev].
constexpr int64_t kRCoefDecay = 0;
constexpr int64_t kRCoefInvAlphaPrev = 1;
constexpr int64_t kRecoverCoeffsLen = 2;

// The standard-mode state (grad_prev) is stored either like x / grad (S = T) or compactly
// as bfloat16 (S = c10::BFloat16; check_like(..., allow_bf16_state) validated that these
// are the only options). Calls f with a null S* as a type tag:
//   dispatch_state_type<scalar_t>(grad_prev.scalar_type(), [&](auto* tag) {
//     using S = std::remove_pointer_t<decltype(tag)>; ... });
// For T = bfloat16 both branches are the same instantiation.
template <typename T, typename F>
void dispatch_state_type(c10::ScalarType state, const F& f) {
  if (state == c10::CppTypeToScalarType<T>::value) {
    f(static_cast<T*>(nullptr));
  } else {
    f(static_cast<c10::BFloat16*>(nullptr));
  }
}

inline bool is_supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

// The first vector argument fixes dtype, device and length for the others.
// `any_shape`: a tensor-list element, which may have any shape (the kernels see its
// contiguous storage as a vector); the single-tensor ops take 1-D vectors.
inline void check_first_vector(const at::Tensor& t, const char* op, const char* name,
                               bool any_shape = false) {
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, "elra_fused.", op, ": ", name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "elra_fused.", op, ": ", name,
                   " has dtype ", t.scalar_type(),
                   "; supported dtypes are float32, bfloat16 and float16");
  TORCH_CHECK_VALUE(any_shape || t.dim() == 1, "elra_fused.", op, ": ", name,
                    " must be a 1-D flat tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "elra_fused.", op, ": ", name, " must be contiguous");
}

// The previous-gradient state of the standard-mode ops may be stored compactly: its
// dtype is either the reference's (x / grad) or bfloat16, whatever the reference dtype.
inline bool is_allowed_state_dtype(c10::ScalarType state, c10::ScalarType ref) {
  return state == ref || state == c10::kBFloat16;
}

// `allow_bf16_state`: t is the grad_prev state of dots / update_, which may be bfloat16
// while ref is not (elra_fused/ops/validation.py: _check_like(..., state=True)).
inline void check_like(const at::Tensor& t, const char* op, const char* name,
                       const at::Tensor& ref, const char* ref_name,
                       bool allow_bf16_state = false, bool any_shape = false) {
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, "elra_fused.", op, ": ", name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
  if (allow_bf16_state) {
    TORCH_CHECK_TYPE(is_allowed_state_dtype(t.scalar_type(), ref.scalar_type()), "elra_fused.",
                     op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
                     " has dtype ", ref.scalar_type(), "; ", name, " must have ", ref_name,
                     "'s dtype or bfloat16 (compact state)");
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "elra_fused.", op, ": ", name,
                     " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
                     ref.scalar_type(), "; all vector arguments must share one dtype");
  }
  TORCH_CHECK_VALUE(t.device() == ref.device(), "elra_fused.", op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device());
  if (any_shape) {
    TORCH_CHECK_VALUE(t.numel() == ref.numel(), "elra_fused.", op, ": ", name, " must have ",
                      ref.numel(), " elements (like ", ref_name, "), got shape ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == ref.numel(), "elra_fused.", op, ": ", name,
                      " must be 1-D with ", ref.numel(), " elements (like ", ref_name,
                      "), got shape ", t.sizes());
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), "elra_fused.", op, ": ", name, " must be contiguous");
}

inline void check_coeffs(const at::Tensor& c, const char* op, int64_t len,
                         const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(c.layout() == c10::kStrided && c.scalar_type() == c10::kDouble,
                   "elra_fused.", op, ": coeffs must be a dense float64 tensor, got dtype ",
                   c.scalar_type());
  TORCH_CHECK_VALUE(c.dim() == 1 && c.numel() == len, "elra_fused.", op,
                    ": coeffs must have shape [", len, "], got ", c.sizes());
  TORCH_CHECK_VALUE(c.device() == ref.device(), "elra_fused.", op, ": coeffs is on ",
                    c.device(), " but ", ref_name, " is on ", ref.device(),
                    " (coefficients are read on the device, never copied to the host)");
  TORCH_CHECK_VALUE(c.is_contiguous(), "elra_fused.", op, ": coeffs must be contiguous");
}

// In-place ops write through one pointer while reading the others element by element;
// overlapping buffers would make the result depend on the kernel's traversal order.
inline void check_no_overlap(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const char* op) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto* pa = static_cast<const char*>(a.const_data_ptr());
  const auto* pb = static_cast<const char*>(b.const_data_ptr());
  // Byte spans per tensor: the element sizes differ when the state is bfloat16.
  const int64_t a_bytes = a.numel() * static_cast<int64_t>(a.element_size());
  const int64_t b_bytes = b.numel() * static_cast<int64_t>(b.element_size());
  const bool overlap = (pa < pb + b_bytes) && (pb < pa + a_bytes);
  TORCH_CHECK_VALUE(!overlap, "elra_fused.", op, ": ", a_name, " and ", b_name,
                    " share memory; they must be distinct buffers");
}

inline void check_dots(const at::Tensor& grad, const at::Tensor& grad_prev,
                       const char* op = "dots", bool any_shape = false) {
  check_first_vector(grad, op, "grad", any_shape);
  check_like(grad_prev, op, "grad_prev", grad, "grad", /*allow_bf16_state=*/true, any_shape);
}

inline void check_dots_recover(const at::Tensor& x_prev, const at::Tensor& x,
                               const at::Tensor& grad, const at::Tensor& coeffs) {
  check_first_vector(x, "dots_recover", "x");
  check_like(x_prev, "dots_recover", "x_prev", x, "x");
  check_like(grad, "dots_recover", "grad", x, "x");
  check_coeffs(coeffs, "dots_recover", kRecoverCoeffsLen, x, "x");
}

// Shared by update_ (other = grad_prev, may be bfloat16: allow_bf16_state),
// update_recover_ (other = x_prev, a point: always x's dtype) and update_swap_ (other =
// grad_prev, which trades roles with grad: always x's dtype).
inline void check_update(const char* op, const at::Tensor& x, const at::Tensor& grad,
                         const at::Tensor& other, const char* other_name,
                         const at::Tensor& coeffs, bool allow_bf16_state,
                         bool any_shape = false) {
  check_first_vector(x, op, "x", any_shape);
  check_like(grad, op, "grad", x, "x", false, any_shape);
  check_like(other, op, other_name, x, "x", allow_bf16_state, any_shape);
  check_coeffs(coeffs, op, kUpdateCoeffsLen, x, "x");
  check_no_overlap(x, "x", grad, "grad", op);
  check_no_overlap(x, "x", other, other_name, op);
  check_no_overlap(other, other_name, grad, "grad", op);
}

// ---------------------------------------------------------------------------------------
// The three in-place update ops are one implementation per device with two compile-time
// flags: update_ <false, false>, update_recover_ <kRecover = true> (other = x_prev, the
// previous point) and update_swap_ <kSwap = true> (grad and grad_prev trade roles: accept
// writes only x, a retrace also writes grad <- grad_prev). The list forms take
// kRecover = false.
// ---------------------------------------------------------------------------------------
template <bool kRecover, bool kSwap>
struct UpdateOp {
  static_assert(!(kRecover && kSwap), "recover mode has no swap form");
  static constexpr const char* kName =
      kSwap ? "update_swap_" : (kRecover ? "update_recover_" : "update_");
  static constexpr const char* kQualifiedName =
      kSwap ? "elra_fused::update_swap_"
            : (kRecover ? "elra_fused::update_recover_" : "elra_fused::update_");
  static constexpr const char* kListName = kSwap ? "update_swap_list_" : "update_list_";
  static constexpr const char* kQualifiedListName =
      kSwap ? "elra_fused::update_swap_list_" : "elra_fused::update_list_";
  static constexpr const char* kOtherName = kRecover ? "x_prev" : "grad_prev";
  // Only standard mode may keep grad_prev compactly as bfloat16: x_prev is a point, and in
  // swap mode grad_prev becomes the next gradient buffer.
  static constexpr bool kCompactState = !kRecover && !kSwap;
};

// Pointer types of the update kernels: grad is written only in swap mode (on a retrace);
// other (grad_prev / x_prev) is written except in swap mode (on an accept).
template <typename T, bool kSwap>
using UpdateGradPtr = std::conditional_t<kSwap, T*, const T*>;
template <typename S, bool kSwap>
using UpdateOtherPtr = std::conditional_t<kSwap, const S*, S*>;

// t's elements as T*, or as const T* where the kernel only reads them.
template <typename T, bool kWritten>
auto typed_data(const at::Tensor& t) {
  if constexpr (kWritten) {
    return t.data_ptr<T>();
  } else {
    return t.const_data_ptr<T>();
  }
}

// Validates an update op's arguments (messages as the Python validation's).
template <bool kRecover, bool kSwap>
void check_update_op(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& other,
                     const at::Tensor& coeffs) {
  using Op = UpdateOp<kRecover, kSwap>;
  check_update(Op::kName, x, grad, other, Op::kOtherName, coeffs, Op::kCompactState);
}

// Calls f with a null S* type tag (as dispatch_state_type): S is the storage type of an
// update's other vector, T or -- standard mode (kCompactState) only -- bfloat16.
template <typename T, bool kCompactState, typename F>
void dispatch_other_type(c10::ScalarType other, const F& f) {
  if constexpr (kCompactState) {
    dispatch_state_type<T>(other, f);
  } else {
    f(static_cast<T*>(nullptr));
  }
}

// Dispatches a validated update on x's dtype T and other's storage type S (T, or bfloat16
// for a compact grad_prev) and calls f(x, grad, other) with typed pointers:
//   f(T* x, UpdateGradPtr<T, kSwap> grad, UpdateOtherPtr<S, kSwap> other).
template <bool kRecover, bool kSwap, typename F>
void dispatch_update(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& other,
                     const F& f) {
  using Op = UpdateOp<kRecover, kSwap>;
  ELRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), Op::kQualifiedName, [&] {
    dispatch_other_type<scalar_t, Op::kCompactState>(other.scalar_type(), [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;
      f(x.data_ptr<scalar_t>(), typed_data<scalar_t, kSwap>(grad),
        typed_data<S, !kSwap>(other));
    });
  });
}

// ---------------------------------------------------------------------------------------
// Tensor lists (dots_list, update_list_, update_swap_list_; semantics: elra_fused/ops,
// "Tensor lists" in its docstring, and elra_fused/ops/lists.py).
// Every element is validated before the first one is touched (all-or-nothing).
// ---------------------------------------------------------------------------------------
inline void check_lists(const char* op, at::TensorList a, const char* a_name, at::TensorList b,
                        const char* b_name) {
  TORCH_CHECK_VALUE(!a.empty(), "elra_fused.", op, ": ", a_name,
                    " is empty; pass at least one tensor");
  TORCH_CHECK_VALUE(a.size() == b.size(), "elra_fused.", op, ": ", a_name, " has ", a.size(),
                    " tensors but ", b_name, " has ", b.size());
}

// Element i of a list as the 1-D vector the single-tensor ops take (`flatten`: for the
// per-element loop of the CUDA implementation), or as it is (the CPU kernels only need its
// contiguous storage: no view per element per call).
inline at::Tensor list_element(const at::Tensor& t, const char* op, const char* name, size_t i,
                               bool flatten) {
  if (!flatten) {
    return t;
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), "elra_fused.", op, ": ", name, "[", i,
                    "] must be contiguous");
  return t.view({-1});  // never copies: in-place ops stay in place
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

// The validated elements of a dots_list call.
struct DotsLists {
  std::vector<at::Tensor> grad, grad_prev;
};

inline DotsLists checked_dots_lists(at::TensorList grad, at::TensorList grad_prev,
                                    bool flatten) {
  check_lists("dots_list", grad, "grad", grad_prev, "grad_prev");
  DotsLists out{std::vector<at::Tensor>(grad.size()), std::vector<at::Tensor>(grad.size())};
  for (size_t i = 0; i < grad.size(); ++i) {
    out.grad[i] = list_element(grad[i], "dots_list", "grad", i, flatten);
    out.grad_prev[i] = list_element(grad_prev[i], "dots_list", "grad_prev", i, flatten);
    check_element(i, [&] { check_dots(out.grad[i], out.grad_prev[i], "dots_list", !flatten); });
  }
  return out;
}

// The validated elements of an update_list_ / update_swap_list_ call. Only update_list_
// (copy semantics) allows a compact bfloat16 grad_prev.
struct UpdateLists {
  std::vector<at::Tensor> x, grad, grad_prev;
};

inline UpdateLists checked_update_lists(const char* op, at::TensorList x, at::TensorList grad,
                                        at::TensorList grad_prev, const at::Tensor& coeffs,
                                        bool allow_bf16_state, bool flatten) {
  check_lists(op, x, "x", grad, "grad");
  check_lists(op, x, "x", grad_prev, "grad_prev");
  const size_t n = x.size();
  UpdateLists out{std::vector<at::Tensor>(n), std::vector<at::Tensor>(n),
                  std::vector<at::Tensor>(n)};
  for (size_t i = 0; i < n; ++i) {
    out.x[i] = list_element(x[i], op, "x", i, flatten);
    out.grad[i] = list_element(grad[i], op, "grad", i, flatten);
    out.grad_prev[i] = list_element(grad_prev[i], op, "grad_prev", i, flatten);
    check_element(i, [&] {
      check_update(op, out.x[i], out.grad[i], out.grad_prev[i], "grad_prev", coeffs,
                   allow_bf16_state, !flatten);
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The implementations of one device, which module.cpp registers under the op names (one
// registration for both devices): the single-tensor ops from the device's ops source, the
// tensor-list ops from its list_ops source.
// ---------------------------------------------------------------------------------------
struct SingleImpls {
  using Dots = at::Tensor (*)(const at::Tensor&, const at::Tensor&);
  using DotsRecover = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&);
  using Update = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&);
  Dots dots;
  DotsRecover dots_recover;
  Update update_;
  Update update_recover_;
  Update update_swap_;
};

struct ListImpls {
  using DotsList = at::Tensor (*)(at::TensorList, at::TensorList);
  using UpdateList = void (*)(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&);
  DotsList dots_list;
  UpdateList update_list_;
  UpdateList update_swap_list_;
};

namespace cpu {
SingleImpls single_impls();  // cpu/ops.cpp
ListImpls list_impls();      // cpu/list_ops.cpp
}  // namespace cpu
namespace cuda {
SingleImpls single_impls();  // cuda/ops.cu
ListImpls list_impls();      // cuda/list_ops.cu
}  // namespace cuda

}  // namespace elra
