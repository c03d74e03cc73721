// CPU kernels of the five ELRA vector passes (semantics: elra_fused/reference_ops.py),
// their TORCH_LIBRARY_IMPL(CPU) registration and the `elra_fused._C` Python module.
//
// Determinism: the reductions split the vector into fixed-size chunks (kChunk elements,
// independent of the thread count); each chunk writes its fp64 partial sums into its own
// slot and the slots are summed in chunk order by one thread. Results are therefore
// bit-identical across runs and across torch.set_num_threads(...) values. No atomics.
//
// Accuracy: fp32 math with kLanes independent fp32 accumulators (which also lets the
// compiler vectorize the loop without -ffast-math reassociation), folded into fp64 every
// kSubBlock elements so fp32 rounding never grows over more than a few dozen additions.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "elra_common.h"

namespace elra {
namespace {

// Elements per OpenMP work item. Large enough that the per-chunk overhead (a few fp64
// folds, one partial slot) is negligible, small enough that 2..64 threads stay balanced
// on the sizes we care about (>= 1M elements).
constexpr int64_t kChunk = int64_t{1} << 16;
// Independent fp32 accumulators: 16 floats = four SSE / two AVX registers, enough to hide
// the add latency. Each lane is a separate sum, so vectorizing needs no reassociation.
constexpr int kLanes = 16;
// Elements accumulated in fp32 before folding the lanes into fp64 (64 adds per lane).
constexpr int64_t kSubBlock = 1024;
static_assert(kChunk % kSubBlock == 0 && kSubBlock % kLanes == 0, "chunking must nest");

// Below this many elements the OpenMP fork/join costs more than the work.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

int num_threads_for(int64_t n) {
  return n >= kMinParallelElems ? at::get_num_threads() : 1;
}

// Storage codec of the element loops: how a stored element becomes fp32 and back.
// float32 is the identity; bfloat16 and float16 work on raw uint16_t bits with
// branch-free conversions the loop vectorizer can handle (specializations below).
template <typename T>
struct Codec {
  using Raw = T;
  static float load(Raw v) { return static_cast<float>(v); }
  static Raw store(float f) { return static_cast<T>(f); }
};

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// c ? a : b with integer masks. A plain ?: between values computed by float ops lets
// GCC sink those ops into branches (they may trap under the default -ftrapping-math),
// and then the loop no longer vectorizes ("control flow in loop").
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// bfloat16 as raw uint16_t bits with the same rounding as c10::BFloat16 (round to nearest
// even, NaN -> 0x7FC0), written branch-free: the c10 struct's per-element constructor
// (an if on isnan) keeps GCC from vectorizing the update loops (measured: 16M-element
// bf16 update 14 ms with it, 6.6 ms without, on 2 cores).
template <>
struct Codec<c10::BFloat16> {
  using Raw = uint16_t;
  static constexpr uint32_t kRoundBias = 0x7FFFu;
  static constexpr uint16_t kQuietNaN = 0x7FC0u;
  static float load(Raw v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }
  static Raw store(float f) {
    const uint32_t u = f32_to_bits(f);
    const auto rounded = static_cast<uint16_t>((u + kRoundBias + ((u >> 16) & 1u)) >> 16);
    return f != f ? kQuietNaN : rounded;  // f != f: the NaN test, as a vectorizable compare
  }
};

// float16 as raw uint16_t bits, bit-identical to c10::Half's portable (non-F16C)
// conversions: exact widening, round to nearest even on narrowing (overflow -> +-inf,
// fp32 values below the fp16 subnormal range -> +-0), NaN -> sign | 0x7E00. Without
// -mf16c, c10::Half converts one element at a time through a function with an `if`,
// which keeps GCC from vectorizing the loops; these selects vectorize with plain SSE2.
// Both directions use only IEEE add / multiply on normal numbers, so flush-to-zero /
// denormals-are-zero modes (torch.set_flush_denormal) do not change the results, and
// no multiply feeds an add (nothing for FMA contraction to fuse).
template <>
struct Codec<c10::Half> {
  using Raw = uint16_t;
  static float load(Raw h) {
    // Half bits moved into an fp32 exponent offset by 0xE0 (so a half inf/NaN exponent
    // becomes 0xFF), then scaled back by 2^-112 (exact; inf/NaN stay inf/NaN).
    // Subnormal halves: mantissa placed under 0.5f's exponent, minus 0.5f (exact).
    constexpr uint32_t kExpOffset = 0xE0u << 23;
    constexpr uint32_t kScaleBits = 15u << 23;  // 2^-112
    constexpr uint32_t kHalfBits = 126u << 23;  // 0.5f
    constexpr uint32_t kSubnormalCutoff = 1u << 27;
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normal = bits_to_f32((two_w >> 4) + kExpOffset) * bits_to_f32(kScaleBits);
    const float subnormal = bits_to_f32((two_w >> 17) | kHalfBits) - 0.5f;
    return bits_to_f32(
        sign | select_bits(two_w < kSubnormalCutoff, f32_to_bits(subnormal), f32_to_bits(normal)));
  }
  static Raw store(float f) {
    constexpr uint32_t kMinNormal = 113u << 23;     // 2^-14, smallest normal half
    constexpr uint32_t kOverflow = 143u << 23;      // 2^16: rounds to inf from here up
    constexpr uint32_t kInfBits = 0x7F800000u;
    constexpr uint32_t kRebias = static_cast<uint32_t>(15 - 127) << 23;  // wraps mod 2^32
    const uint32_t u = f32_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;  // |f|
    // Subnormal (or zero) half: adding 0.5f puts the unit 2^-24 in fp32's last mantissa
    // place, so the hardware add rounds to nearest even; a round-up into 2^-14 yields
    // the smallest normal's encoding, as it should.
    const uint32_t sub = f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u;
    // Normal half: rebias the exponent, then drop 13 mantissa bits with round to nearest
    // even (add 0xFFF plus the lowest kept bit); a carry bumps the exponent, up to inf.
    const uint32_t norm = (a + kRebias + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t r = select_bits(a < kMinNormal, sub, norm);
    r = select_bits(a >= kOverflow, 0x7C00u, r);
    r = select_bits(a > kInfBits, 0x7E00u, r);  // NaN (c10's quiet NaN)
    return static_cast<Raw>(r | sign);
  }
};

template <typename T>
inline const typename Codec<T>::Raw* raw_ptr(const T* p) {
  return reinterpret_cast<const typename Codec<T>::Raw*>(p);
}

// A value stored as T, re-stored as the state type S: a bit copy when S == T, otherwise
// T -> fp32 (exact) -> S with S's codec (for bfloat16: round to nearest even, NaN kept,
// bit-identical to torch's .to(torch.bfloat16)). Branch-free either way.
template <typename T, typename S>
inline typename Codec<S>::Raw to_state(typename Codec<T>::Raw v) {
  if constexpr (std::is_same_v<T, S>) {
    return v;
  } else {
    return Codec<S>::store(Codec<T>::load(v));
  }
}

// Per-element G_prev in recover mode. Written as (x_prev - x) + (decay - 1) * x_prev
// instead of decay * x_prev - x: x_prev and x are close, so x_prev - x is exact in fp32
// (Sterbenz) and the small (decay - 1) * x_prev term carries only a tiny absolute
// rounding error, whereas rounding decay * x_prev to fp32 first would lose ~1e-7 * |x|
// against a difference that may be only ~1e-4 * |x|.
inline float recover_diff(float xp, float x, float decay_m1) {
  return (xp - x) + decay_m1 * xp;
}

// ---------------------------------------------------------------------------------------
// Reductions. `GPrev` maps an element index to G_prev_i (loaded or recovered).
// ---------------------------------------------------------------------------------------
template <typename T, typename GPrev>
inline void dots_chunk(const T* g_typed, int64_t begin, int64_t end, GPrev gprev,
                       double* __restrict slot) {
  using C = Codec<T>;
  const auto* __restrict g = raw_ptr(g_typed);
  double s_gg = 0.0;
  double s_gpg = 0.0;
  for (int64_t b = begin; b < end; b += kSubBlock) {
    const int64_t b_end = std::min(b + kSubBlock, end);
    const int64_t v_end = b + (b_end - b) / kLanes * kLanes;
    float a_gg[kLanes] = {};
    float a_gpg[kLanes] = {};
    for (int64_t i = b; i < v_end; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float gi = C::load(g[i + l]);
        a_gg[l] += gi * gi;
        a_gpg[l] += gprev(i + l) * gi;
      }
    }
    for (int64_t i = v_end; i < b_end; ++i) {  // scalar tail of the last sub-block
      const float gi = C::load(g[i]);
      a_gg[0] += gi * gi;
      a_gpg[0] += gprev(i) * gi;
    }
    for (int l = 0; l < kLanes; ++l) {  // fixed fold order
      s_gg += static_cast<double>(a_gg[l]);
      s_gpg += static_cast<double>(a_gpg[l]);
    }
  }
  slot[0] = s_gg;
  slot[1] = s_gpg;
}

template <typename T, typename GPrev>
void dots_driver(const T* g, int64_t n, GPrev gprev, double* out) {
  const int64_t nchunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(2 * std::max<int64_t>(nchunks, 1)), 0.0);
  double* slots = partial.data();
  const int nthreads = num_threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk;
    dots_chunk(g, begin, std::min(begin + kChunk, n), gprev, slots + 2 * c);
  }
  double gg = 0.0;
  double gpg = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {  // fixed order => deterministic
    gg += slots[2 * c];
    gpg += slots[2 * c + 1];
  }
  out[0] = gg;
  out[1] = gpg;
}

// ---------------------------------------------------------------------------------------
// Element-wise update. `accept` is read from the coefficient tensor here, on the tensor's
// own device (the CPU), so no other device is synchronised. On a retrace the gradient
// pointer is never dereferenced: a non-finite gradient cannot reach x.
// ---------------------------------------------------------------------------------------
struct UpdateCoeffs {
  bool accept;
  float decay;
  float step;
  float back;
  float decay_m1;  // decay - 1, formed in fp64 (see recover_diff)
};

UpdateCoeffs load_update_coeffs(const at::Tensor& coeffs) {
  const double* c = coeffs.const_data_ptr<double>();
  return UpdateCoeffs{c[kCoefAccept] != 0.0, static_cast<float>(c[kCoefDecay]),
                      static_cast<float>(c[kCoefStep]), static_cast<float>(c[kCoefBack]),
                      static_cast<float>(c[kCoefDecay] - 1.0)};
}

// Runs body(begin, end) over fixed chunks in parallel (static schedule).
template <typename Body>
void parallel_chunks(int64_t n, const Body& body) {
  const int64_t nchunks = num_chunks(n);
  const int nthreads = num_threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk;
    body(begin, std::min(begin + kChunk, n));
  }
}

// The element loops are free functions taking restrict pointers and scalar coefficients
// by value: inside a lambda capturing by reference, the compiler must assume a store to
// x may change a captured coefficient, which blocks vectorization.
//
// Accept. Standard mode: other = grad_prev <- grad. Recover mode: other = x_prev <- x.
// S is other's storage type: T, or bfloat16 for a compact grad_prev (standard mode only).
template <typename T, typename S, bool kRecover>
void accept_range(T* __restrict x, const T* __restrict g, S* __restrict other, float decay,
                  float step, int64_t begin, int64_t end) {
  static_assert(!kRecover || std::is_same_v<T, S>, "x_prev is a point: stored like x");
  using C = Codec<T>;
  using Raw = typename C::Raw;
  auto* __restrict xr = reinterpret_cast<Raw*>(x);
  const auto* __restrict gr = reinterpret_cast<const Raw*>(g);
  auto* __restrict orw = reinterpret_cast<typename Codec<S>::Raw*>(other);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const Raw xi = xr[i];
    const Raw gi = gr[i];
    orw[i] = to_state<T, S>(kRecover ? xi : gi);  // bit copy, or rounded to bf16
    xr[i] = C::store(decay * C::load(xi) - step * C::load(gi));
  }
}

#if defined(__SSE2__)
// fp32 accept with a streaming (non-temporal) store of `other`. `other` is written without
// being read, so a normal store first pulls each of its cache lines in (read for
// ownership): 20 bytes of traffic per element instead of 16. Streaming it straight to
// memory measured 1.5x faster on 2 cores at 16M and 64M elements (37 -> 55 GB/s). x is
// read and written in place, so its plain store costs no extra traffic. The sfence
// orders the streamed stores before the data is used by any other thread.
template <bool kRecover>
void accept_range_f32_stream(float* __restrict x, const float* __restrict g,
                             float* __restrict other, float decay, float step, int64_t begin,
                             int64_t end) {
  constexpr int64_t kVec = 4;  // floats per SSE register
  int64_t i = begin;
  // Scalar prologue until `other + i` is 16-byte aligned (_mm_stream_ps requires it).
  for (; i < end && (reinterpret_cast<uintptr_t>(other + i) & 15u) != 0; ++i) {
    const float xi = x[i];
    const float gi = g[i];
    other[i] = kRecover ? xi : gi;
    x[i] = decay * xi - step * gi;
  }
  const __m128 decay_v = _mm_set1_ps(decay);
  const __m128 step_v = _mm_set1_ps(step);
  for (; i + kVec <= end; i += kVec) {
    const __m128 xi = _mm_loadu_ps(x + i);
    const __m128 gi = _mm_loadu_ps(g + i);
    _mm_stream_ps(other + i, kRecover ? xi : gi);
    // Same operations, same order as the scalar loop: decay * x - step * g.
    _mm_storeu_ps(x + i, _mm_sub_ps(_mm_mul_ps(decay_v, xi), _mm_mul_ps(step_v, gi)));
  }
  for (; i < end; ++i) {
    const float xi = x[i];
    const float gi = g[i];
    other[i] = kRecover ? xi : gi;
    x[i] = decay * xi - step * gi;
  }
  _mm_sfence();
}
#endif

// Retrace. The gradient is not an argument: it cannot be read.
template <typename T, typename S, bool kRecover>
void retrace_range(T* __restrict x, const S* __restrict other, float back, float decay_m1,
                   int64_t begin, int64_t end) {
  using C = Codec<T>;
  using Raw = typename C::Raw;
  auto* __restrict xr = reinterpret_cast<Raw*>(x);
  const auto* __restrict orw = raw_ptr(other);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float xi = C::load(xr[i]);
    const float oi = Codec<S>::load(orw[i]);
    const float dir = kRecover ? recover_diff(oi, xi, decay_m1) : oi;
    xr[i] = C::store(xi + back * dir);
  }
}

// Swap mode (reference_ops.update_swap_). Accept: x only; neither gradient buffer is
// touched (12 bytes per fp32 element: the caller swaps the buffers' roles afterwards).
// Same operations in the same order as accept_range, minus the `other` store.
template <typename T>
void accept_swap_range(T* __restrict x, const T* __restrict g, float decay, float step,
                       int64_t begin, int64_t end) {
  using C = Codec<T>;
  using Raw = typename C::Raw;
  auto* __restrict xr = reinterpret_cast<Raw*>(x);
  const auto* __restrict gr = reinterpret_cast<const Raw*>(g);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    xr[i] = C::store(decay * C::load(xr[i]) - step * C::load(gr[i]));
  }
}

// Swap-mode retrace: x <- x + back * grad_prev and grad <- grad_prev (bit copy), so that
// after the caller's swap the state is still G_{t-1}. `grad` is only written, never read:
// a non-finite gradient cannot reach x.
template <typename T>
void retrace_swap_range(T* __restrict x, T* __restrict g_out, const T* __restrict gp,
                        float back, int64_t begin, int64_t end) {
  using C = Codec<T>;
  using Raw = typename C::Raw;
  auto* __restrict xr = reinterpret_cast<Raw*>(x);
  auto* __restrict gw = reinterpret_cast<Raw*>(g_out);
  const auto* __restrict gpr = reinterpret_cast<const Raw*>(gp);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const Raw gpi = gpr[i];
    gw[i] = gpi;
    xr[i] = C::store(C::load(xr[i]) + back * C::load(gpi));
  }
}

template <typename T>
void update_swap_typed(T* x, T* g, const T* gp, const UpdateCoeffs& k, int64_t n) {
  const float decay = k.decay;
  const float step = k.step;
  const float back = k.back;
  if (k.accept) {
    parallel_chunks(n, [=](int64_t begin, int64_t end) {
      accept_swap_range<T>(x, g, decay, step, begin, end);
    });
  } else {
    parallel_chunks(n, [=](int64_t begin, int64_t end) {
      retrace_swap_range<T>(x, g, gp, back, begin, end);
    });
  }
}

template <typename T, typename S, bool kRecover>
void update_typed(T* x, const T* g, S* other, const UpdateCoeffs& k, int64_t n) {
  const float decay = k.decay;
  const float step = k.step;
  const float back = k.back;
  const float decay_m1 = k.decay_m1;
  if (k.accept) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
      parallel_chunks(n, [=](int64_t begin, int64_t end) {
        accept_range_f32_stream<kRecover>(x, g, other, decay, step, begin, end);
      });
      return;
    }
#endif
    parallel_chunks(n, [=](int64_t begin, int64_t end) {
      accept_range<T, S, kRecover>(x, g, other, decay, step, begin, end);
    });
  } else {
    parallel_chunks(n, [=](int64_t begin, int64_t end) {
      retrace_range<T, S, kRecover>(x, other, back, decay_m1, begin, end);
    });
  }
}

at::Tensor dots_cpu(const at::Tensor& grad, const at::Tensor& grad_prev) {
  check_dots(grad, grad_prev);
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  const int64_t n = grad.numel();
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots", [&] {
    dispatch_state_type<scalar_t>(grad_prev.scalar_type(), [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
      const auto* gp = raw_ptr(grad_prev.const_data_ptr<S>());
      dots_driver(
          grad.const_data_ptr<scalar_t>(), n,
          [gp](int64_t i) { return Codec<S>::load(gp[i]); }, out.data_ptr<double>());
    });
  });
  return out;
}

at::Tensor dots_recover_cpu(const at::Tensor& x_prev, const at::Tensor& x,
                            const at::Tensor& grad, const at::Tensor& coeffs) {
  check_dots_recover(x_prev, x, grad, coeffs);
  at::Tensor out = at::empty({2}, grad.options().dtype(at::kDouble));
  const double* c = coeffs.const_data_ptr<double>();
  const float decay_m1 = static_cast<float>(c[kRCoefDecay] - 1.0);
  const float inv_alpha = static_cast<float>(c[kRCoefInvAlphaPrev]);
  const int64_t n = grad.numel();
  ELRA_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "elra_fused::dots_recover", [&] {
    using C = Codec<scalar_t>;
    const auto* xp = raw_ptr(x_prev.const_data_ptr<scalar_t>());
    const auto* xc = raw_ptr(x.const_data_ptr<scalar_t>());
    dots_driver(
        grad.const_data_ptr<scalar_t>(), n,
        [xp, xc, decay_m1, inv_alpha](int64_t i) {
          return recover_diff(C::load(xp[i]), C::load(xc[i]), decay_m1) * inv_alpha;
        },
        out.data_ptr<double>());
  });
  return out;
}

void update_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& grad_prev,
                const at::Tensor& coeffs) {
  check_update("update_", x, grad, grad_prev, "grad_prev", coeffs, /*allow_bf16_state=*/true);
  const UpdateCoeffs k = load_update_coeffs(coeffs);
  ELRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "elra_fused::update_", [&] {
    dispatch_state_type<scalar_t>(grad_prev.scalar_type(), [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
      update_typed<scalar_t, S, false>(x.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                       grad_prev.data_ptr<S>(), k, x.numel());
    });
  });
}

void update_recover_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x_prev,
                        const at::Tensor& coeffs) {
  check_update("update_recover_", x, grad, x_prev, "x_prev", coeffs, /*allow_bf16_state=*/false);
  const UpdateCoeffs k = load_update_coeffs(coeffs);
  ELRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "elra_fused::update_recover_", [&] {
    update_typed<scalar_t, scalar_t, true>(x.data_ptr<scalar_t>(),
                                           grad.const_data_ptr<scalar_t>(),
                                           x_prev.data_ptr<scalar_t>(), k, x.numel());
  });
}

void update_swap_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& grad_prev,
                     const at::Tensor& coeffs) {
  // Swap mode: grad and grad_prev exchange roles, so both must have x's dtype (no compact
  // bf16 state).
  check_update("update_swap_", x, grad, grad_prev, "grad_prev", coeffs,
               /*allow_bf16_state=*/false);
  const UpdateCoeffs k = load_update_coeffs(coeffs);
  ELRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "elra_fused::update_swap_", [&] {
    update_swap_typed<scalar_t>(x.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                grad_prev.const_data_ptr<scalar_t>(), k, x.numel());
  });
}

// ---------------------------------------------------------------------------------------
// Tensor lists (dots_list, update_list_, update_swap_list_): one parallel region over the
// fixed chunks of all tensors, instead of a fork/join per tensor -- a model has hundreds
// of parameter tensors, many of them small. Per tensor the chunks, the element loops,
// the fp64 slots and their in-order sum are exactly those of the single-tensor op, so
// each list op equals the single op applied per element (dots_list: the per-tensor
// results added in list order), bit for bit. Each tensor's element functions are chosen
// once by dtype, outside the parallel region (nothing there can throw).
// ---------------------------------------------------------------------------------------
struct ListChunk {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<ListChunk> list_chunks(const std::vector<at::Tensor>& tensors, int64_t* total) {
  std::vector<ListChunk> chunks;
  *total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = tensors[i].numel();
    *total += n;
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      chunks.push_back({i, begin, std::min(begin + kChunk, n)});
    }
  }
  return chunks;
}

// Runs body(chunk index, chunk) over all chunks in parallel (static schedule).
template <typename Body>
void parallel_list_chunks(const std::vector<ListChunk>& chunks, int64_t total, const Body& body) {
  const auto count = static_cast<int64_t>(chunks.size());
  const int nthreads = num_threads_for(total);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t c = 0; c < count; ++c) {
    body(c, chunks[static_cast<size_t>(c)]);
  }
}

using DotsChunkFn = void (*)(const void* grad, const void* grad_prev, int64_t begin,
                             int64_t end, double* slot);

template <typename T, typename S>
void dots_chunk_erased(const void* grad, const void* grad_prev, int64_t begin, int64_t end,
                       double* slot) {
  const auto* gp = raw_ptr(static_cast<const S*>(grad_prev));
  dots_chunk(
      static_cast<const T*>(grad), begin, end, [gp](int64_t i) { return Codec<S>::load(gp[i]); },
      slot);
}

at::Tensor dots_list_cpu(at::TensorList grad, at::TensorList grad_prev) {
  const DotsLists lists = checked_dots_lists(grad, grad_prev, /*flatten=*/false);
  const size_t count = lists.grad.size();
  std::vector<DotsChunkFn> fns(count);
  std::vector<const void*> g(count), gp(count);
  for (size_t i = 0; i < count; ++i) {
    ELRA_DISPATCH_FLOAT_TYPES(lists.grad[i].scalar_type(), "elra_fused::dots_list", [&] {
      dispatch_state_type<scalar_t>(lists.grad_prev[i].scalar_type(), [&](auto* tag) {
        using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
        fns[i] = &dots_chunk_erased<scalar_t, S>;
      });
    });
    g[i] = lists.grad[i].const_data_ptr();
    gp[i] = lists.grad_prev[i].const_data_ptr();
  }
  int64_t total = 0;
  const std::vector<ListChunk> chunks = list_chunks(lists.grad, &total);
  std::vector<double> partial(2 * std::max<size_t>(chunks.size(), 1), 0.0);
  double* slots = partial.data();
  parallel_list_chunks(chunks, total, [&](int64_t c, const ListChunk& chunk) {
    fns[chunk.tensor](g[chunk.tensor], gp[chunk.tensor], chunk.begin, chunk.end, slots + 2 * c);
  });
  // Per tensor: its slots in chunk order from 0.0 (as dots_driver); then the tensors in
  // list order, the first one taken as it is (as the per-tensor loop does).
  double gg = 0.0;
  double gpg = 0.0;
  size_t c = 0;
  for (size_t i = 0; i < count; ++i) {
    double tensor_gg = 0.0;
    double tensor_gpg = 0.0;
    for (; c < chunks.size() && chunks[c].tensor == i; ++c) {
      tensor_gg += slots[2 * c];
      tensor_gpg += slots[2 * c + 1];
    }
    gg = i == 0 ? tensor_gg : gg + tensor_gg;
    gpg = i == 0 ? tensor_gpg : gpg + tensor_gpg;
  }
  at::Tensor out = at::empty({2}, lists.grad[0].options().dtype(at::kDouble));
  out.data_ptr<double>()[0] = gg;
  out.data_ptr<double>()[1] = gpg;
  return out;
}

using UpdateChunkFn = void (*)(void* x, void* grad, void* grad_prev, const UpdateCoeffs& k,
                               int64_t begin, int64_t end);

// update_ on one chunk (the branches of update_typed, standard mode).
template <typename T, typename S>
void update_chunk_erased(void* x, void* grad, void* grad_prev, const UpdateCoeffs& k,
                         int64_t begin, int64_t end) {
  auto* xt = static_cast<T*>(x);
  const auto* g = static_cast<const T*>(grad);
  auto* gp = static_cast<S*>(grad_prev);
  if (k.accept) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
      accept_range_f32_stream<false>(xt, g, gp, k.decay, k.step, begin, end);
      return;
    }
#endif
    accept_range<T, S, false>(xt, g, gp, k.decay, k.step, begin, end);
  } else {
    retrace_range<T, S, false>(xt, gp, k.back, k.decay_m1, begin, end);
  }
}

// update_swap_ on one chunk (the branches of update_swap_typed).
template <typename T>
void update_swap_chunk_erased(void* x, void* grad, void* grad_prev, const UpdateCoeffs& k,
                              int64_t begin, int64_t end) {
  if (k.accept) {
    accept_swap_range<T>(static_cast<T*>(x), static_cast<const T*>(grad), k.decay, k.step,
                         begin, end);
  } else {
    retrace_swap_range<T>(static_cast<T*>(x), static_cast<T*>(grad),
                          static_cast<const T*>(grad_prev), k.back, begin, end);
  }
}

void run_update_lists(const UpdateLists& lists, const std::vector<UpdateChunkFn>& fns,
                      const at::Tensor& coeffs) {
  const UpdateCoeffs k = load_update_coeffs(coeffs);
  const size_t count = lists.x.size();
  std::vector<void*> x(count), g(count), gp(count);
  for (size_t i = 0; i < count; ++i) {
    x[i] = lists.x[i].data_ptr();
    g[i] = lists.grad[i].data_ptr();
    gp[i] = lists.grad_prev[i].data_ptr();
  }
  int64_t total = 0;
  const std::vector<ListChunk> chunks = list_chunks(lists.x, &total);
  parallel_list_chunks(chunks, total, [&](int64_t, const ListChunk& chunk) {
    const size_t t = chunk.tensor;
    fns[t](x[t], g[t], gp[t], k, chunk.begin, chunk.end);
  });
}

void update_list_cpu(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                     const at::Tensor& coeffs) {
  const UpdateLists lists = checked_update_lists("update_list_", x, grad, grad_prev, coeffs,
                                                 /*allow_bf16_state=*/true, /*flatten=*/false);
  std::vector<UpdateChunkFn> fns(lists.x.size());
  for (size_t i = 0; i < fns.size(); ++i) {
    ELRA_DISPATCH_FLOAT_TYPES(lists.x[i].scalar_type(), "elra_fused::update_list_", [&] {
      dispatch_state_type<scalar_t>(lists.grad_prev[i].scalar_type(), [&](auto* tag) {
        using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bfloat16
        fns[i] = &update_chunk_erased<scalar_t, S>;
      });
    });
  }
  run_update_lists(lists, fns, coeffs);
}

void update_swap_list_cpu(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                          const at::Tensor& coeffs) {
  const UpdateLists lists = checked_update_lists("update_swap_list_", x, grad, grad_prev, coeffs,
                                                 /*allow_bf16_state=*/false, /*flatten=*/false);
  std::vector<UpdateChunkFn> fns(lists.x.size());
  for (size_t i = 0; i < fns.size(); ++i) {
    ELRA_DISPATCH_FLOAT_TYPES(lists.x[i].scalar_type(), "elra_fused::update_swap_list_", [&] {
      fns[i] = &update_swap_chunk_erased<scalar_t>;
    });
  }
  run_update_lists(lists, fns, coeffs);
}

}  // namespace
}  // namespace elra

// Schemas are defined in elra_fused/ops.py (the single documented place); loading this
// library before or after that definition is fine: the dispatcher accepts an
// implementation for a not-yet-defined operator and binds it once the schema appears.
TORCH_LIBRARY_IMPL(elra_fused, CPU, m) {
  m.impl("dots", &elra::dots_cpu);
  m.impl("dots_recover", &elra::dots_recover_cpu);
  m.impl("update_", &elra::update_cpu);
  m.impl("update_recover_", &elra::update_recover_cpu);
  m.impl("update_swap_", &elra::update_swap_cpu);
  m.impl("dots_list", &elra::dots_list_cpu);
  m.impl("update_list_", &elra::update_list_cpu);
  m.impl("update_swap_list_", &elra::update_swap_list_cpu);
}

namespace {
// Set by setup.py when the CUDA translation unit (elra_ops_cuda.cu) is compiled in.
#ifdef ELRA_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
#endif
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elra_fused C++/CUDA kernels; importing registers the elra_fused ops.";
  m.def("cuda_compiled", [] { return kCudaCompiled; },
        "True when the CUDA kernels were compiled into this build.");
  m.def("chunk_elems", [] { return elra::kChunk; },
        "Fixed CPU reduction chunk (elements); results do not depend on thread count.");
}
