// CPU kernels of the ELRA vector passes (semantics: elra_fused/reference_ops.py): storage
// codecs, the fixed chunking and the OpenMP element loops, shared by the single-tensor ops
// (cpu/ops.cpp) and the tensor-list ops (cpu/list_ops.cpp).
//
// Determinism: the reductions split the vector into fixed-size chunks (kChunk elements,
// independent of the thread count); each chunk writes its fp64 partial sums into its own
// slot and the slots are summed in chunk order by one thread. Results are therefore
// bit-identical across runs and across torch.set_num_threads(...) values. No atomics.
//
// Accuracy: the reductions widen every element to fp64 and form products and sums in
// fp64. A product of two fp32 (or bf16 / fp16) values is exact in fp64 (24 + 24 bits of
// significand, exponents far inside fp64's range), so over the whole finite fp32 range
// nothing overflows or underflows and only the fp64 additions round, as in the float64
// reference. kLanes independent fp64 accumulators let the compiler vectorize the loop
// (fp32 lanes converted to fp64 vectors) without -ffast-math reassociation; on x86 they
// run as an AVX2 build where the CPU has it (dots_chunk; stored float32 vectors with
// exact fused products, dots_chunk_f32_avx2). The update loops stay fp32 math.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common.h"

// Runtime dispatch of the reductions to an AVX2 build of their loops (GCC / Clang on x86).
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define ELRA_CPU_AVX2_DISPATCH 1
#define ELRA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define ELRA_CPU_AVX2_DISPATCH 0
#define ELRA_ALWAYS_INLINE
#endif

namespace elra::cpu {

// Elements per OpenMP work item. Large enough that the per-chunk overhead (a few fp64
// folds, one partial slot) is negligible, small enough that 2..64 threads stay balanced
// on the sizes we care about (>= 1M elements).
constexpr int64_t kChunk = int64_t{1} << 16;
// Independent fp64 accumulators per sum: 16 doubles = four AVX registers, enough to hide
// the add latency. Each lane is a separate sum, so vectorizing needs no reassociation.
constexpr int kLanes = 16;
static_assert(kChunk % kLanes == 0, "chunks hold whole lane groups");

// Below this many elements the OpenMP fork/join costs more than the work.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

inline int num_threads_for(int64_t n) {
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

// p's elements as Codec<T>::Raw, keeping p's constness.
template <typename T>
inline const typename Codec<T>::Raw* raw_ptr(const T* p) {
  return reinterpret_cast<const typename Codec<T>::Raw*>(p);
}

template <typename T>
inline typename Codec<T>::Raw* raw_ptr(T* p) {
  return reinterpret_cast<typename Codec<T>::Raw*>(p);
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

// Per-element retrace direction of the recover-mode update (fp32 math). Written as
// (x_prev - x) + (decay - 1) * x_prev instead of decay * x_prev - x: x_prev and x are
// close, so x_prev - x is exact in fp32 (Sterbenz) and the small (decay - 1) * x_prev term
// carries only a tiny absolute rounding error, whereas rounding decay * x_prev to fp32
// first would lose ~1e-7 * |x| against a difference that may be only ~1e-4 * |x|.
// (dots_recover forms G_prev in fp64, where decay * x_prev - x loses only ~1e-16 * |x|:
// cpu/ops.cpp.)
inline float recover_diff(float xp, float x, float decay_m1) {
  return (xp - x) + decay_m1 * xp;
}

// ---------------------------------------------------------------------------------------
// Reductions. `GPrev` maps an element index to G_prev_i as a double (loaded and widened,
// or recovered in fp64). Per chunk: kLanes fp64 lanes in element order, then the lanes
// added in lane order.
// ---------------------------------------------------------------------------------------
// The end of every chunk: the scalar tail [v_end, end) of the last chunk added into lane
// 0, then the lanes summed in lane order into slot[0..1].
template <typename T, typename GPrev>
ELRA_ALWAYS_INLINE inline void finish_lanes(double* a_gg, double* a_gpg, const T* g_typed,
                                            GPrev gprev, int64_t v_end, int64_t end,
                                            double* __restrict slot) {
  const auto* g = raw_ptr(g_typed);
  for (int64_t i = v_end; i < end; ++i) {
    const double gi = Codec<T>::load(g[i]);
    a_gg[0] += gi * gi;
    a_gpg[0] += gprev(i) * gi;
  }
  double s_gg = 0.0;
  double s_gpg = 0.0;
  for (int l = 0; l < kLanes; ++l) {  // fixed fold order
    s_gg += a_gg[l];
    s_gpg += a_gpg[l];
  }
  slot[0] = s_gg;
  slot[1] = s_gpg;
}

template <typename T, typename GPrev>
ELRA_ALWAYS_INLINE inline void dots_chunk_body(const T* g_typed, int64_t begin, int64_t end,
                                               GPrev gprev, double* __restrict slot) {
  using C = Codec<T>;
  const auto* __restrict g = raw_ptr(g_typed);
  double a_gg[kLanes] = {};
  double a_gpg[kLanes] = {};
  const int64_t v_end = begin + (end - begin) / kLanes * kLanes;
  for (int64_t i = begin; i < v_end; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double gi = C::load(g[i + l]);
      a_gg[l] += gi * gi;
      a_gpg[l] += gprev(i + l) * gi;
    }
  }
  finish_lanes(a_gg, a_gpg, g_typed, gprev, v_end, end, slot);
}

#if ELRA_CPU_AVX2_DISPATCH
// The same loops compiled for AVX2, chosen at run time. Converting fp32 lanes to fp64
// halves the elements per SSE2 instruction: in cache, one core sums ~3 G fp32 elements/s
// with SSE2 but ~5.4 G/s with AVX2 (as many as the old fp32 lanes), so 2 cores stay
// memory bound. No FMA is enabled (nothing is contracted), so the AVX2 build gives the
// baseline build's bits, lane for lane.
template <typename T, typename GPrev>
__attribute__((target("avx2"))) void dots_chunk_avx2(const T* g, int64_t begin, int64_t end,
                                                     GPrev gprev, double* slot) {
  dots_chunk_body(g, begin, end, gprev, slot);
}

// Set (to anything but "" or "0") when the process starts, ELRA_FUSED_CPU_BASELINE keeps
// the baseline (SSE2) loops even on an AVX2 CPU: how the tests check that both builds
// give the same bits (python_tests/test_ops_backends.py).
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* baseline = std::getenv("ELRA_FUSED_CPU_BASELINE");
    if (baseline != nullptr && baseline[0] != '\0' && std::strcmp(baseline, "0") != 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

// The AVX2 CPUs that also fuse multiply-add (all of them in practice; checked anyway).
inline bool cpu_has_avx2_fma() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("fma") != 0;
  return has;
}

// The end of the intrinsic chunks below: the 4 x 4 lanes stored in lane order, then
// finish_lanes (the scalar tail into lane 0, the fold), as dots_chunk_body ends.
template <typename GPrev>
__attribute__((target("avx2"))) inline void fold_lanes_avx2(const __m256d* gg,
                                                            const __m256d* gpg, const float* g,
                                                            GPrev gprev, int64_t v_end,
                                                            int64_t end, double* slot) {
  double a_gg[kLanes];
  double a_gpg[kLanes];
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_pd(a_gg + 4 * k, gg[k]);
    _mm256_storeu_pd(a_gpg + 4 * k, gpg[k]);
  }
  finish_lanes(a_gg, a_gpg, g, gprev, v_end, end, slot);
}

// dots_chunk_body for float32 vectors, written out with intrinsics: the compiler's
// vectorization of the lane loop reloads and re-extracts each vector and chains two adds
// per lane per iteration, which bounds it in cache (measured at 1M elements, 2 cores:
// 64-82 GB/s against 114-170 GB/s here). The same 16 lanes (4 vectors of 4 doubles, lane
// l = element begin + 16 k + l), the same scalar tail into lane 0 and the same fold in
// lane order (fold_lanes_avx2). G_{t-1} is `a` as stored (standard mode), or, kRecover,
// (decay x_{t-1} - x) inv_alpha from a = x_{t-1}, b = x, formed as dots_recover's plain
// loop does (multiply, subtract, multiply). A product is fused into its sum (FMA) only
// where it is exact: two float32 values widened to float64 multiply to at most 48
// significant bits, far inside float64's range, so fma(a, b, s) = round(a b + s) =
// round(round(a b) + s), the baseline's bits (the AVX2 / baseline test checks it). G_i^2
// always is; a recovered G_{t-1} is not a stored value, so its product is rounded first.
template <bool kRecover>
__attribute__((target("avx2,fma"))) inline void dots_chunk_f32_avx2(
    const float* g, const float* a, const float* b, double decay, double inv_alpha,
    int64_t begin, int64_t end, double* slot) {
  static_assert(kLanes == 16, "four vectors of four doubles");
  [[maybe_unused]] const __m256d decay_v = _mm256_set1_pd(decay);
  [[maybe_unused]] const __m256d inv_alpha_v = _mm256_set1_pd(inv_alpha);
  __m256d gg[4];
  __m256d gpg[4];
  for (int k = 0; k < 4; ++k) {
    gg[k] = _mm256_setzero_pd();
    gpg[k] = _mm256_setzero_pd();
  }
  const int64_t v_end = begin + (end - begin) / kLanes * kLanes;
  for (int64_t i = begin; i < v_end; i += kLanes) {
    for (int k = 0; k < 4; ++k) {
      const __m256d gv = _mm256_cvtps_pd(_mm_loadu_ps(g + i + 4 * k));
      const __m256d av = _mm256_cvtps_pd(_mm_loadu_ps(a + i + 4 * k));
      gg[k] = _mm256_fmadd_pd(gv, gv, gg[k]);
      if constexpr (kRecover) {
        const __m256d xv = _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4 * k));
        const __m256d gp =
            _mm256_mul_pd(_mm256_sub_pd(_mm256_mul_pd(decay_v, av), xv), inv_alpha_v);
        gpg[k] = _mm256_add_pd(gpg[k], _mm256_mul_pd(gp, gv));
      } else {
        gpg[k] = _mm256_fmadd_pd(av, gv, gpg[k]);
      }
    }
  }
  const auto gprev = [a, b, decay, inv_alpha](int64_t i) {
    if constexpr (kRecover) {
      return (decay * static_cast<double>(a[i]) - static_cast<double>(b[i])) * inv_alpha;
    } else {
      return static_cast<double>(a[i]);
    }
  };
  fold_lanes_avx2(gg, gpg, g, gprev, v_end, end, slot);
}
#endif

// One chunk's [sum G_i^2, sum G_prev_i G_i] into slot[0..1] (AVX2 where the CPU has it).
template <typename T, typename GPrev>
void dots_chunk(const T* g, int64_t begin, int64_t end, GPrev gprev, double* slot) {
#if ELRA_CPU_AVX2_DISPATCH
  if (cpu_has_avx2()) {
    dots_chunk_avx2(g, begin, end, gprev, slot);
    return;
  }
#endif
  dots_chunk_body(g, begin, end, gprev, slot);
}

// dots_chunk with G_{t-1} read from its storage (S: T, or bfloat16 for a compact state).
template <typename T, typename S>
void dots_chunk_stored(const T* g, const S* grad_prev, int64_t begin, int64_t end,
                       double* slot) {
#if ELRA_CPU_AVX2_DISPATCH
  if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
    if (cpu_has_avx2_fma()) {
      dots_chunk_f32_avx2<false>(g, grad_prev, nullptr, 0.0, 0.0, begin, end, slot);
      return;
    }
  }
#endif
  const auto* gp = raw_ptr(grad_prev);
  dots_chunk(
      g, begin, end, [gp](int64_t i) { return static_cast<double>(Codec<S>::load(gp[i])); },
      slot);
}

// The chunks of an n-element reduction in parallel (chunk(begin, end, slot) fills slot's
// two partial sums), then their slots added in chunk order into out[0..1].
template <typename Chunk>
void reduce_chunks(int64_t n, const Chunk& chunk, double* out) {
  const int64_t nchunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(2 * std::max<int64_t>(nchunks, 1)), 0.0);
  double* slots = partial.data();
  const int nthreads = num_threads_for(n);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t begin = c * kChunk;
    chunk(begin, std::min(begin + kChunk, n), slots + 2 * c);
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
// Element-wise update: update_ (standard), update_recover_ (kRecover) and update_swap_
// (kSwap) are one set of loops with compile-time flags (UpdateOp in common.h). `accept` is
// read from the coefficient tensor here, on the tensor's own device (the CPU), so no other
// device is synchronised. On a retrace the gradient is never read: a non-finite gradient
// cannot reach x.
// ---------------------------------------------------------------------------------------
struct UpdateCoeffs {
  bool accept;
  float decay;
  float step;
  float back;
  float decay_m1;  // decay - 1, formed in fp64 (see recover_diff)
  float remain;    // 1 - back, formed in fp64: the recover-mode retrace (see retrace_range)
  bool stream;     // write G_{t-1} / x_prev with streaming stores (kStreamMinElems)
};

// Streaming (non-temporal) stores of the accept's pure write pay off only where the
// vectors do not stay in cache anyway: they send each line to memory at once, so a pass
// whose data would fit in the last-level cache loses its cache hits. Measured on 2 cores
// with a 32 MB L3 (update_ accept, fp32): 1M elements 0.153 ms streamed, 0.104 ms with
// plain stores; 2M 0.31 streamed, 0.47 plain; 4M 0.79 streamed, 1.28 plain; at 16M and
// 64M streaming is ~1.5x faster. So the stores stream from this many elements in the
// whole call (x, G and G_{t-1} together 24 MB of fp32). Either way each element is
// computed with the same operations, so the bits are equal.
constexpr int64_t kStreamMinElems = int64_t{1} << 21;

// The coefficients of an update over `total` elements (all tensors of a list op).
inline UpdateCoeffs load_update_coeffs(const at::Tensor& coeffs, int64_t total) {
  const double* c = coeffs.const_data_ptr<double>();
  return UpdateCoeffs{c[kCoefAccept] != 0.0,
                      static_cast<float>(c[kCoefDecay]),
                      static_cast<float>(c[kCoefStep]),
                      static_cast<float>(c[kCoefBack]),
                      static_cast<float>(c[kCoefDecay] - 1.0),
                      static_cast<float>(1.0 - c[kCoefBack]),
                      total >= kStreamMinElems};
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
// Accept: x <- decay * x - step * grad, and
//   standard mode: other = grad_prev <- grad (S: T, or bfloat16 for a compact grad_prev);
//   recover mode:  other = x_prev <- x;
//   swap mode:     nothing else (12 bytes per fp32 element): grad and grad_prev are left
//                  as they are, the caller swaps their roles afterwards.
template <typename T, typename S, bool kRecover, bool kSwap>
ELRA_ALWAYS_INLINE inline void accept_range(T* __restrict x, const T* __restrict g, UpdateOtherPtr<S, kSwap> other,
                  float decay, float step, int64_t begin, int64_t end) {
  static_assert(!kRecover || std::is_same_v<T, S>, "x_prev is a point: stored like x");
  using C = Codec<T>;
  using Raw = typename C::Raw;
  auto* __restrict xr = raw_ptr(x);
  const auto* __restrict gr = raw_ptr(g);
  [[maybe_unused]] auto* __restrict orw = raw_ptr(other);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const Raw xi = xr[i];
    const Raw gi = gr[i];
    if constexpr (!kSwap) {
      orw[i] = to_state<T, S>(kRecover ? xi : gi);  // bit copy, or rounded to bf16
    }
    xr[i] = C::store(decay * C::load(xi) - step * C::load(gi));
  }
}

#if defined(__SSE2__)
// fp32 accept with a streaming (non-temporal) store of `other` (standard and recover
// mode). `other` is written without being read, so a normal store first pulls each of its
// cache lines in (read for ownership): 20 bytes of traffic per element instead of 16.
// Streaming it straight to memory measured 1.5x faster on 2 cores at 16M and 64M elements
// (37 -> 55 GB/s). x is read and written in place, so its plain store costs no extra
// traffic. The sfence orders the streamed stores before the data is used by any other
// thread.
template <bool kRecover>
ELRA_ALWAYS_INLINE inline void accept_range_f32_stream(float* __restrict x, const float* __restrict g,
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

// Retrace: x <- x + back * dir, dir = grad_prev (standard, swap). Swap mode also writes
// grad <- grad_prev (bit copy), so that after the caller's swap the state is still
// G_{t-1}; grad is only written, never read. In the other modes grad is not touched.
// Recover mode (dir = decay * x_prev - x, recover_diff) forms the same point from whichever
// end is nearer: x + back * dir for back < 1/2, else decay * x_prev - remain * dir with
// remain = 1 - back = alpha_t / alpha_{t-1}. Each rounds ~eps * (|end| + |fraction * dir|),
// and a full return (back = 1, a restart) gives decay * x_prev itself -- x_prev exactly when
// decay = 1 -- even after a huge step, where x + (x_prev - x) rounds.
constexpr float kHalf = 0.5f;  // recover-mode retrace: which end the point is formed from

template <typename T, typename S, bool kRecover, bool kSwap>
ELRA_ALWAYS_INLINE inline void retrace_range(T* __restrict x, UpdateGradPtr<T, kSwap> g, const S* __restrict other,
                   float back, float remain, float decay_m1, int64_t begin, int64_t end) {
  static_assert(!kSwap || std::is_same_v<T, S>, "swap mode: grad and grad_prev trade roles");
  using C = Codec<T>;
  auto* __restrict xr = raw_ptr(x);
  [[maybe_unused]] auto* __restrict gw = raw_ptr(g);
  const auto* __restrict orw = raw_ptr(other);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const auto oi_raw = orw[i];
    if constexpr (kSwap) {
      gw[i] = oi_raw;
    }
    const float xi = C::load(xr[i]);
    const float oi = Codec<S>::load(oi_raw);
    if constexpr (kRecover) {
      const float dir = recover_diff(oi, xi, decay_m1);
      xr[i] = C::store(back < kHalf ? xi + back * dir : (oi + decay_m1 * oi) - remain * dir);
    } else {
      xr[i] = C::store(xi + back * oi);
    }
  }
}

// One chunk of an update: the accept or the retrace loop (`accept` is uniform over the
// call). Shared by the single-tensor ops and the tensor-list ops.
template <typename T, typename S, bool kRecover, bool kSwap>
ELRA_ALWAYS_INLINE inline void update_chunk_body(T* x, UpdateGradPtr<T, kSwap> g,
                                                 UpdateOtherPtr<S, kSwap> other,
                                                 const UpdateCoeffs& k, int64_t begin,
                                                 int64_t end) {
  if (k.accept) {
#if defined(__SSE2__)
    if constexpr (!kSwap && std::is_same_v<T, float> && std::is_same_v<S, float>) {
      if (k.stream) {
        accept_range_f32_stream<kRecover>(x, g, other, k.decay, k.step, begin, end);
        return;
      }
    }
#endif
    accept_range<T, S, kRecover, kSwap>(x, g, other, k.decay, k.step, begin, end);
  } else {
    retrace_range<T, S, kRecover, kSwap>(x, g, other, k.back, k.remain, k.decay_m1, begin, end);
  }
}

#if ELRA_CPU_AVX2_DISPATCH
// The update loops compiled for AVX2, chosen at run time as for the reductions. They are
// memory bound, but with two threads the baseline SSE2 build issues twice the vector
// instructions and measured 5-13 % below torch's (AVX2) add_ on the same buffers. No FMA
// is enabled, so each element is rounded exactly as in the baseline build.
template <typename T, typename S, bool kRecover, bool kSwap>
__attribute__((target("avx2"))) void update_chunk_avx2(T* x, UpdateGradPtr<T, kSwap> g,
                                                       UpdateOtherPtr<S, kSwap> other,
                                                       const UpdateCoeffs& k, int64_t begin,
                                                       int64_t end) {
  update_chunk_body<T, S, kRecover, kSwap>(x, g, other, k, begin, end);
}
#endif

template <typename T, typename S, bool kRecover, bool kSwap>
void update_chunk(T* x, UpdateGradPtr<T, kSwap> g, UpdateOtherPtr<S, kSwap> other,
                  const UpdateCoeffs& k, int64_t begin, int64_t end) {
#if ELRA_CPU_AVX2_DISPATCH
  if (cpu_has_avx2()) {
    update_chunk_avx2<T, S, kRecover, kSwap>(x, g, other, k, begin, end);
    return;
  }
#endif
  update_chunk_body<T, S, kRecover, kSwap>(x, g, other, k, begin, end);
}

// A whole single-tensor update, chunked over the OpenMP threads.
template <typename T, typename S, bool kRecover, bool kSwap>
void update_typed(T* x, UpdateGradPtr<T, kSwap> g, UpdateOtherPtr<S, kSwap> other,
                  const UpdateCoeffs& k, int64_t n) {
  parallel_chunks(n, [=](int64_t begin, int64_t end) {
    update_chunk<T, S, kRecover, kSwap>(x, g, other, k, begin, end);
  });
}

}  // namespace elra::cpu
