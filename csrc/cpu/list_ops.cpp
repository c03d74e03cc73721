// The tensor-list CPU ops (dots_list, update_list_, update_swap_list_; semantics in the
// Python package elra_fused/ops): native OpenMP kernels (cpu/kernels.h).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "kernels.h"

namespace elra::cpu {
namespace {

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
  dots_chunk_stored(static_cast<const T*>(grad), static_cast<const S*>(grad_prev), begin, end,
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
  // Per tensor: its slots in chunk order from 0.0 (as reduce_chunks); then the tensors in
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

// update_ / update_swap_ (kSwap) on one chunk: the single-tensor op's update_chunk.
template <typename T, typename S, bool kSwap>
void update_chunk_erased(void* x, void* grad, void* grad_prev, const UpdateCoeffs& k,
                         int64_t begin, int64_t end) {
  update_chunk<T, S, /*kRecover=*/false, kSwap>(static_cast<T*>(x), static_cast<T*>(grad),
                                                static_cast<S*>(grad_prev), k, begin, end);
}

// update_list_ / update_swap_list_ (kSwap; UpdateOp in common.h).
template <bool kSwap>
void update_list_cpu(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                     const at::Tensor& coeffs) {
  using Op = UpdateOp</*kRecover=*/false, kSwap>;
  const UpdateLists lists = checked_update_lists(Op::kListName, x, grad, grad_prev, coeffs,
                                                 Op::kCompactState, /*flatten=*/false);
  const size_t count = lists.x.size();
  std::vector<UpdateChunkFn> fns(count);
  std::vector<void*> xp(count), g(count), gp(count);
  for (size_t i = 0; i < count; ++i) {
    ELRA_DISPATCH_FLOAT_TYPES(lists.x[i].scalar_type(), Op::kQualifiedListName, [&] {
      dispatch_other_type<scalar_t, Op::kCompactState>(
          lists.grad_prev[i].scalar_type(), [&](auto* tag) {
            using S = std::remove_pointer_t<decltype(tag)>;  // grad_prev: scalar_t or bf16
            fns[i] = &update_chunk_erased<scalar_t, S, kSwap>;
          });
    });
    xp[i] = lists.x[i].data_ptr();
    g[i] = lists.grad[i].data_ptr();
    gp[i] = lists.grad_prev[i].data_ptr();
  }
  int64_t total = 0;
  const std::vector<ListChunk> chunks = list_chunks(lists.x, &total);
  const UpdateCoeffs k = load_update_coeffs(coeffs, total);
  parallel_list_chunks(chunks, total, [&](int64_t, const ListChunk& chunk) {
    const size_t t = chunk.tensor;
    fns[t](xp[t], g[t], gp[t], k, chunk.begin, chunk.end);
  });
}

}  // namespace

ListImpls list_impls() {
  return {&dots_list_cpu, &update_list_cpu</*kSwap=*/false>, &update_list_cpu</*kSwap=*/true>};
}

}  // namespace elra::cpu
