// Shared by the CPU (elra_ops.cpp) and CUDA (elra_ops_cuda.cu) kernels: coefficient
// layouts and input validation. The op schemas themselves live in ONE place,
// elra_fused/ops.py (torch.library.define); this library only registers implementations.
//
// Validation messages mirror elra_fused/ops.py::_validate so that every backend raises
// the same ValueError / TypeError for the same user mistake.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

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

inline bool is_supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

// The first vector argument fixes dtype, device and length for the others.
inline void check_first_vector(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, "elra_fused.", op, ": ", name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), "elra_fused.", op, ": ", name,
                   " has dtype ", t.scalar_type(),
                   "; supported dtypes are float32, bfloat16 and float16");
  TORCH_CHECK_VALUE(t.dim() == 1, "elra_fused.", op, ": ", name,
                    " must be a 1-D flat tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "elra_fused.", op, ": ", name, " must be contiguous");
}

inline void check_like(const at::Tensor& t, const char* op, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, "elra_fused.", op, ": ", name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "elra_fused.", op, ": ", name,
                   " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
                   ref.scalar_type(), "; all vector arguments must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "elra_fused.", op, ": ", name, " is on ",
                    t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == ref.numel(), "elra_fused.", op, ": ", name,
                    " must be 1-D with ", ref.numel(), " elements (like ", ref_name,
                    "), got shape ", t.sizes());
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
  if (a.numel() == 0) return;
  const auto* pa = static_cast<const char*>(a.const_data_ptr());
  const auto* pb = static_cast<const char*>(b.const_data_ptr());
  const int64_t bytes = a.numel() * static_cast<int64_t>(a.element_size());
  const bool overlap = (pa < pb + bytes) && (pb < pa + bytes);
  TORCH_CHECK_VALUE(!overlap, "elra_fused.", op, ": ", a_name, " and ", b_name,
                    " share memory; they must be distinct buffers");
}

inline void check_dots(const at::Tensor& grad, const at::Tensor& grad_prev) {
  check_first_vector(grad, "dots", "grad");
  check_like(grad_prev, "dots", "grad_prev", grad, "grad");
}

inline void check_dots_recover(const at::Tensor& x_prev, const at::Tensor& x,
                               const at::Tensor& grad, const at::Tensor& coeffs) {
  check_first_vector(x, "dots_recover", "x");
  check_like(x_prev, "dots_recover", "x_prev", x, "x");
  check_like(grad, "dots_recover", "grad", x, "x");
  check_coeffs(coeffs, "dots_recover", kRecoverCoeffsLen, x, "x");
}

// Shared by update_ (other = grad_prev) and update_recover_ (other = x_prev).
inline void check_update(const char* op, const at::Tensor& x, const at::Tensor& grad,
                         const at::Tensor& other, const char* other_name,
                         const at::Tensor& coeffs) {
  check_first_vector(x, op, "x");
  check_like(grad, op, "grad", x, "x");
  check_like(other, op, other_name, x, "x");
  check_coeffs(coeffs, op, kUpdateCoeffsLen, x, "x");
  check_no_overlap(x, "x", grad, "grad", op);
  check_no_overlap(x, "x", other, other_name, op);
  check_no_overlap(other, other_name, grad, "grad", op);
}

}  // namespace elra
