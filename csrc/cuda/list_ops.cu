// CUDA implementations of the tensor-list ops dots_list / update_list_ / update_swap_list_
// (semantics: elra_fused/ops, "Tensor lists"): multi-tensor kernels, one launch per dtype
// group and table instead of one per tensor, so a model with hundreds of parameters (the
// per-parameter layout, FSDP2 shards) is not launch-bound.
//
// As in torch's multi_tensor_apply, each launch gets a table by value (kernel parameters,
// no host-to-device copy, nothing to keep alive, capturable in a CUDA graph): up to
// kListTensors tensors' pointers and sizes, and where each tensor's blocks start in the
// launch's grid. A block finds its tensor by a binary search over those starts (uniform
// across the block: constant-bank reads) and runs the single-tensor kernel body
// (kernels.cuh) as that *virtual block* of the grid the single op would launch for that
// tensor. For the updates any grid gives the same elements; for dots_list it makes every
// list element's partials -- and, summed in the single op's fixed order, its result --
// bit-identical to dots() on that element. A second kernel finishes each element in its
// own block, and a third adds the per-element results in list order, one fp64 addition
// after another, as on every other backend.
//
// Every element is validated before the first launch (all-or-nothing). The elements must
// not overlap one another (as for torch's _foreach ops): they are processed concurrently.
// Lists whose elements are on several devices take the per-element path (the single op
// per tensor, which then fails to add results that live on different devices).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.cuh"

namespace elra::cuda {
namespace {

// Tensors per launch table: ListTable<3> (3 pointers per tensor) stays within the classic
// 4 KB kernel-parameter limit, so no newer-driver parameter space is needed.
constexpr int kListTensors = 64;
// Update blocks per list element: each thread of a virtual block covers this many packs
// (a block of 256 threads: 8192 floats), so a launch has a block per 32 KB of fp32 x.
constexpr int64_t kListPacksPerThread = 8;
// Elements per finishing launch (one block each).
constexpr int kFinishTensors = 256;

// Pointers (kPtrs per tensor: dots grad, grad_prev; updates x, grad, grad_prev), sizes,
// virtual grids and first grid block of up to kListTensors tensors. Tensor t owns the
// launch's blocks [block_end[t - 1], block_end[t]), block b of them being its virtual
// block b of nblocks[t].
template <int kPtrs>
struct ListTable {
  void* ptr[kPtrs][kListTensors];
  int64_t n[kListTensors];
  int64_t slot0[kListTensors];  // dots: the element's first partial slot in the list buffer
  int32_t nblocks[kListTensors];
  int32_t block_end[kListTensors];
  bool vec_ok[kListTensors];
  int tensors = 0;
  int blocks = 0;
};
static_assert(sizeof(ListTable<3>) + 64 <= 4096, "table exceeds the 4 KB parameter limit");
static_assert(std::is_trivially_copyable_v<ListTable<3>>, "kernel parameters are copied");

// The tensor of grid block `block`: the first t with block < block_end[t] (binary search
// over the launch's tensors; every thread of a block takes the same path).
template <int kPtrs>
__device__ __forceinline__ int table_tensor(const ListTable<kPtrs>& table, int block) {
  int lo = 0;
  int hi = table.tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (block < table.block_end[mid]) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Appends a tensor with its virtual grid; false when the table is full (the caller
// launches it and starts a new one, where the tensor always fits).
template <int kPtrs>
bool table_add(ListTable<kPtrs>& table, const std::array<void*, size_t{kPtrs}>& ptrs, int64_t n,
               int64_t slot0, int64_t nblocks, bool vec_ok) {
  // Grid blocks are int32 in the table: a launch stays far below 2^31 (64 tensors of at
  // most kMaxReduceBlocks blocks for dots; updates: see update_list_group's split).
  if (table.tensors == kListTensors || table.blocks + nblocks > INT32_MAX) return false;
  const int t = table.tensors++;
  for (int p = 0; p < kPtrs; ++p) table.ptr[p][t] = ptrs[p];
  table.n[t] = n;
  table.slot0[t] = slot0;
  table.nblocks[t] = static_cast<int32_t>(nblocks);
  table.vec_ok[t] = vec_ok;
  table.blocks += static_cast<int>(nblocks);
  table.block_end[t] = table.blocks;
  return true;
}

// Launches `launch(table)` when the table has blocks, then empties it.
template <int kPtrs, typename Launch>
void flush(ListTable<kPtrs>& table, const Launch& launch) {
  if (table.blocks > 0) launch(table);
  table = ListTable<kPtrs>();
}

template <int kPtrs, typename Launch>
void add_or_flush(ListTable<kPtrs>& table, const std::array<void*, size_t{kPtrs}>& ptrs,
                  int64_t n, int64_t slot0, int64_t nblocks, bool vec_ok, const Launch& launch) {
  if (table_add(table, ptrs, n, slot0, nblocks, vec_ok)) return;
  flush(table, launch);
  const bool added = table_add(table, ptrs, n, slot0, nblocks, vec_ok);
  TORCH_INTERNAL_ASSERT(added, "a list element does not fit an empty launch table");
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    dots_list_partial_kernel(ListTable<2> table, double* __restrict__ partials) {
  const int t = table_tensor(table, blockIdx.x);
  const int64_t block = blockIdx.x - (table.block_end[t] - table.nblocks[t]);
  const GPrevSrc<S, kPackN<T>, false> src{static_cast<const S*>(table.ptr[1][t]), nullptr, 0.0,
                                          0.0};
  dots_block_partial<T, S, false>(static_cast<const T*>(table.ptr[0][t]), src, table.n[t],
                                  table.vec_ok[t], block, table.nblocks[t],
                                  partials + 2 * (table.slot0[t] + block));
}

// Element first + i's result from its slots, in block i (dots_finish_block: the single
// op's order), into results[2 * (first + i)].
struct FinishTable {
  int64_t slot0[kFinishTensors];
  int32_t nblocks[kFinishTensors];
  int64_t first = 0;
};
static_assert(sizeof(FinishTable) + 64 <= 4096, "table exceeds the 4 KB parameter limit");

__global__ void __launch_bounds__(kThreads)
    dots_list_finish_kernel(const double* __restrict__ partials, FinishTable table,
                            double* __restrict__ results) {
  double sums[2];
  dots_finish_block(partials + 2 * table.slot0[blockIdx.x], table.nblocks[blockIdx.x], sums);
  if (threadIdx.x == 0) {
    results[2 * (table.first + blockIdx.x)] = sums[0];
    results[2 * (table.first + blockIdx.x) + 1] = sums[1];
  }
}

// out = ((r_0 + r_1) + r_2) + ...: the list-order sum of every backend. The block loads
// kThreads results at a time into shared memory (one memory round trip per chunk, not
// one per element), and thread 0 adds them in order, starting from r_0 itself (not
// 0 + r_0, which would turn a -0 into +0).
__global__ void __launch_bounds__(kThreads)
    dots_list_sum_kernel(const double* __restrict__ results, int64_t count,
                         double* __restrict__ out) {
  __shared__ double chunk[2 * kThreads];
  double s_gg = 0.0;
  double s_gpg = 0.0;
  for (int64_t base = 0; base < count; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    if (i < count) {
      chunk[2 * threadIdx.x] = results[2 * i];
      chunk[2 * threadIdx.x + 1] = results[2 * i + 1];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t end = std::min<int64_t>(count - base, kThreads);
      for (int64_t j = 0; j < end; ++j) {
        if (base + j == 0) {
          s_gg = chunk[0];
          s_gpg = chunk[1];
        } else {
          s_gg += chunk[2 * j];
          s_gpg += chunk[2 * j + 1];
        }
      }
    }
    __syncthreads();  // the chunk is refilled next
  }
  if (threadIdx.x == 0) {
    out[0] = s_gg;
    out[1] = s_gpg;
  }
}

template <typename T, typename S, bool kSwap>
__global__ void __launch_bounds__(kThreads)
    update_list_kernel(ListTable<3> table, const double* __restrict__ coeffs) {
  const int t = table_tensor(table, blockIdx.x);
  const int64_t block = blockIdx.x - (table.block_end[t] - table.nblocks[t]);
  update_block<T, S, /*kRecover=*/false, kSwap>(
      static_cast<T*>(table.ptr[0][t]), static_cast<UpdateGradPtr<T, kSwap>>(table.ptr[1][t]),
      static_cast<UpdateOtherPtr<S, kSwap>>(table.ptr[2][t]), coeffs, table.n[t],
      table.vec_ok[t], block, table.nblocks[t]);
}

// List indices grouped by (dtype of the first list, dtype of the last), groups in order of
// first appearance, indices in list order.
using DtypeGroups = std::vector<std::pair<std::pair<c10::ScalarType, c10::ScalarType>,
                                          std::vector<size_t>>>;
DtypeGroups group_by_dtype(const std::vector<at::Tensor>& first,
                           const std::vector<at::Tensor>& last) {
  DtypeGroups groups;
  std::map<std::pair<c10::ScalarType, c10::ScalarType>, size_t> where;
  for (size_t i = 0; i < first.size(); ++i) {
    const auto key = std::make_pair(first[i].scalar_type(), last[i].scalar_type());
    const auto [it, fresh] = where.emplace(key, groups.size());
    if (fresh) groups.push_back({key, {}});
    groups[it->second].second.push_back(i);
  }
  return groups;
}

int64_t reduce_blocks_of(const at::Tensor& g) {
  int64_t blocks = 0;
  ELRA_DISPATCH_FLOAT_TYPES(g.scalar_type(), "elra_fused::dots_list",
                            [&] { blocks = reduce_blocks<scalar_t>(g.numel()); });
  return blocks;
}

// Stage 1 of dots_list for the elements `indices` (one dtype group), each into its slots.
template <typename T, typename S>
void dots_list_partials(const DotsLists& lists, const std::vector<size_t>& indices,
                        const std::vector<int64_t>& slot0, const std::vector<int64_t>& nblocks,
                        double* partials, cudaStream_t stream) {
  const auto launch = [&](const ListTable<2>& table) {
    dots_list_partial_kernel<T, S><<<table.blocks, kThreads, 0, stream>>>(table, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  ListTable<2> table;
  for (const size_t i : indices) {
    const at::Tensor& g = lists.grad[i];
    const at::Tensor& gp = lists.grad_prev[i];
    const bool vec_ok = aligned_pack<T, T>(g.const_data_ptr()) &&
                        aligned_pack<T, S>(gp.const_data_ptr());
    const std::array<void*, 2> ptrs{const_cast<void*>(g.const_data_ptr()),
                                    const_cast<void*>(gp.const_data_ptr())};
    add_or_flush(table, ptrs, g.numel(), slot0[i], nblocks[i], vec_ok, launch);
  }
  flush(table, launch);
}

// The per-element path, for lists spread over several devices (the single op per element
// through the dispatcher, results added in list order).
at::Tensor dots_list_per_element(const DotsLists& lists) {
  static const auto dots =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("elra_fused::dots", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::Tensor total = dots.call(lists.grad[0].view({-1}), lists.grad_prev[0].view({-1}));
  for (size_t i = 1; i < lists.grad.size(); ++i) {
    total.add_(dots.call(lists.grad[i].view({-1}), lists.grad_prev[i].view({-1})));
  }
  return total;
}

at::Tensor dots_list_cuda(at::TensorList grad, at::TensorList grad_prev) {
  // Validated as they are (any shape, contiguous): the kernels need only each element's
  // storage, so no per-element view is made.
  const DotsLists lists = checked_dots_lists(grad, grad_prev, /*flatten=*/false);
  const size_t count = lists.grad.size();
  const c10::Device device = lists.grad[0].device();
  for (size_t i = 0; i < count; ++i) {
    if (lists.grad[i].device() != device) return dots_list_per_element(lists);
  }
  const c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Every element's slots in one buffer, in list order: element i owns the reduce_blocks
  // slot pairs from slot0[i] on (the grid its single op would use).
  std::vector<int64_t> slot0(count);
  std::vector<int64_t> nblocks(count);
  int64_t slots = 0;
  for (size_t i = 0; i < count; ++i) {
    slot0[i] = slots;
    nblocks[i] = reduce_blocks_of(lists.grad[i]);
    slots += nblocks[i];
  }
  const auto options = lists.grad[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({2 * slots}, options);
  at::Tensor results = at::empty({2 * static_cast<int64_t>(count)}, options);
  at::Tensor out = at::empty({2}, options);
  for (const auto& [dtypes, indices] : group_by_dtype(lists.grad, lists.grad_prev)) {
    ELRA_DISPATCH_FLOAT_TYPES(dtypes.first, "elra_fused::dots_list", [&] {
      dispatch_state_type<scalar_t>(dtypes.second, [&](auto* tag) {
        using S = std::remove_pointer_t<decltype(tag)>;
        dots_list_partials<scalar_t, S>(lists, indices, slot0, nblocks,
                                        partials.data_ptr<double>(), stream);
      });
    });
  }
  for (size_t first = 0; first < count; first += kFinishTensors) {
    FinishTable finish;
    finish.first = static_cast<int64_t>(first);
    const size_t last = std::min(count, first + kFinishTensors);
    for (size_t i = first; i < last; ++i) {
      finish.slot0[i - first] = slot0[i];
      finish.nblocks[i - first] = static_cast<int32_t>(nblocks[i]);
    }
    dots_list_finish_kernel<<<static_cast<unsigned>(last - first), kThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), finish, results.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dots_list_sum_kernel<<<1, kThreads, 0, stream>>>(
      results.const_data_ptr<double>(), static_cast<int64_t>(count), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// update_list_ / update_swap_list_ for the elements `indices` (one dtype group).
template <typename T, typename S, bool kSwap>
void update_list_group(const UpdateLists& lists, const std::vector<size_t>& indices,
                       const double* coeffs, int64_t block_cap, cudaStream_t stream) {
  const auto launch = [&](const ListTable<3>& table) {
    update_list_kernel<T, S, kSwap><<<table.blocks, kThreads, 0, stream>>>(table, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  ListTable<3> table;
  for (const size_t i : indices) {
    const int64_t n = lists.x[i].numel();
    if (n == 0) continue;  // as the single op: nothing to launch
    T* x = lists.x[i].data_ptr<T>();
    const auto g = typed_data<T, kSwap>(lists.grad[i]);
    const auto other = typed_data<S, !kSwap>(lists.grad_prev[i]);
    const bool vec_ok = aligned_pack<T, T>(x) && aligned_pack<T, T>(g) &&
                        aligned_pack<T, S>(other);
    // A virtual grid that covers the tensor in blocks of kListPacksPerThread packs per
    // thread (grid-stride: any grid gives the same elements), at most as many blocks as
    // the single op launches, so a huge tensor is not one huge grid.
    const int64_t nblocks =
        std::min(ceil_div(ceil_div(n, kPackN<T>), kThreads * kListPacksPerThread),
                 elementwise_blocks<T>(n, block_cap));
    const std::array<void*, 3> ptrs{x, const_cast<T*>(g), const_cast<S*>(other)};
    add_or_flush(table, ptrs, n, 0, nblocks, vec_ok, launch);
  }
  flush(table, launch);
}

// update_list_ / update_swap_list_ (kSwap; UpdateOp in common.h). check_update puts every
// element on coeffs' device, so the list is on one device.
template <bool kSwap>
void update_list_cuda(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                      const at::Tensor& coeffs) {
  using Op = UpdateOp</*kRecover=*/false, kSwap>;
  const UpdateLists lists = checked_update_lists(Op::kListName, x, grad, grad_prev, coeffs,
                                                 Op::kCompactState, /*flatten=*/false);
  const c10::cuda::CUDAGuard guard(coeffs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* c = coeffs.const_data_ptr<double>();
  const int64_t block_cap = elementwise_block_cap();
  for (const auto& [dtypes, indices] : group_by_dtype(lists.x, lists.grad_prev)) {
    ELRA_DISPATCH_FLOAT_TYPES(dtypes.first, Op::kQualifiedListName, [&] {
      dispatch_other_type<scalar_t, Op::kCompactState>(dtypes.second, [&](auto* tag) {
        using S = std::remove_pointer_t<decltype(tag)>;
        update_list_group<scalar_t, S, kSwap>(lists, indices, c, block_cap, stream);
      });
    });
  }
}

}  // namespace

ListImpls list_impls() {
  return {&dots_list_cuda, &update_list_cuda</*kSwap=*/false>, &update_list_cuda</*kSwap=*/true>};
}

}  // namespace elra::cuda
