// CUDA implementations of the tensor-list ops dots_list / update_list_ / update_swap_list_
// (semantics: elra_fused/ops, "Tensor lists"): multi-tensor kernels, one launch per dtype
// group and table instead of one per tensor, so a model with hundreds of parameters (the
// per-parameter layout, FSDP2 shards) is not launch-bound.
//
// As in torch's multi_tensor_apply, each launch gets a table by value (kernel parameters,
// no host-to-device copy, nothing to keep alive, capturable in a CUDA graph): the tensors'
// pointers and sizes, and one entry per block naming a tensor and a *virtual block* of it.
// A block runs the single-tensor kernel body (kernels.cuh) as that virtual block of the
// grid the single op would launch for that tensor. For the updates any grid gives the same
// elements; for dots_list it makes every list element's partials -- and, summed in the
// single op's fixed order, its result -- bit-identical to dots() on that element. The
// per-element results are then added in list order, one fp64 addition after another, as
// on every other backend. A tensor whose grid is large gets the single kernel's own launch
// (writing into its slots of the list's partial buffer): a launch is cheap next to its
// traffic, and it fills the GPU better than the 320-block tables.
//
// Every element is validated before the first launch (all-or-nothing). Lists whose
// elements are on several devices take the per-element path (the single op per tensor).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <utility>
#include <vector>

#include "kernels.cuh"

namespace elra::cuda {
namespace {

// Table capacity per launch: the table (ListTable<3>: 3.1 KB) stays within the classic
// 4 KB kernel-parameter limit, so no newer-driver parameter space is needed.
constexpr int kListTensors = 48;
constexpr int kListBlocks = 320;
// A tensor whose grid has more blocks than this is launched on its own (see above).
constexpr int64_t kListDirectBlocks = 128;
// Update blocks per list element: each thread of a virtual block covers this many packs
// (a block of 256 threads: 8192 floats), so small tensors take few table entries.
constexpr int64_t kListPacksPerThread = 8;
// Finishing a dots_list: per-element (slot, count) pairs per launch (3 KB of parameters).
constexpr int kFinishTensors = 256;

// Pointers (kPtrs per tensor: dots grad, grad_prev; updates x, grad, grad_prev), sizes and
// virtual grids of up to kListTensors tensors, and the entries (tensor, virtual block) of
// the launch's blocks.
template <int kPtrs>
struct ListTable {
  void* ptr[kPtrs][kListTensors];
  int64_t n[kListTensors];
  int64_t slot0[kListTensors];  // dots: the element's first partial slot in the list buffer
  int32_t nblocks[kListTensors];
  bool vec_ok[kListTensors];
  uint8_t entry_tensor[kListBlocks];
  uint16_t entry_block[kListBlocks];
  int tensors = 0;
  int entries = 0;
};
static_assert(sizeof(ListTable<3>) + 64 <= 4096, "table exceeds the 4 KB parameter limit");
static_assert(kListDirectBlocks <= kListBlocks && kListTensors <= 256, "entry field widths");

struct FinishTable {
  int64_t slot0[kFinishTensors];
  int32_t nblocks[kFinishTensors];
  int count = 0;
};
static_assert(sizeof(FinishTable) + 64 <= 4096, "table exceeds the 4 KB parameter limit");

// Appends a tensor with its virtual grid; false when the table has no room (the caller
// launches the table and starts a new one).
template <int kPtrs>
bool table_add(ListTable<kPtrs>& table, const std::array<void*, size_t{kPtrs}>& ptrs, int64_t n,
               int64_t slot0, int64_t nblocks, bool vec_ok) {
  if (table.tensors == kListTensors || table.entries + nblocks > kListBlocks) {
    return false;
  }
  const int t = table.tensors++;
  for (int p = 0; p < kPtrs; ++p) table.ptr[p][t] = ptrs[p];
  table.n[t] = n;
  table.slot0[t] = slot0;
  table.nblocks[t] = static_cast<int32_t>(nblocks);
  table.vec_ok[t] = vec_ok;
  for (int64_t b = 0; b < nblocks; ++b) {
    table.entry_tensor[table.entries] = static_cast<uint8_t>(t);
    table.entry_block[table.entries] = static_cast<uint16_t>(b);
    ++table.entries;
  }
  return true;
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    dots_list_partial_kernel(ListTable<2> table, double* __restrict__ partials) {
  const int t = table.entry_tensor[blockIdx.x];
  const int64_t block = table.entry_block[blockIdx.x];
  const GPrevSrc<S, kPackN<T>, false> src{static_cast<const S*>(table.ptr[1][t]), nullptr, 0.0,
                                          0.0};
  dots_block_partial<T, S, false>(static_cast<const T*>(table.ptr[0][t]), src, table.n[t],
                                  table.vec_ok[t], block, table.nblocks[t],
                                  partials + 2 * (table.slot0[t] + block));
}

// Each element's result from its slots (dots_finish_block: the single op's order), added
// into out in list order: out = r_first for the list's first element, out += r_i after.
__global__ void __launch_bounds__(kThreads)
    dots_list_finish_kernel(const double* __restrict__ partials, FinishTable table,
                            bool starts_list, double* __restrict__ out) {
  for (int i = 0; i < table.count; ++i) {
    double sums[2];
    dots_finish_block(partials + 2 * table.slot0[i], table.nblocks[i], sums);
    if (threadIdx.x == 0) {
      if (starts_list && i == 0) {
        out[0] = sums[0];
        out[1] = sums[1];
      } else {
        out[0] += sums[0];
        out[1] += sums[1];
      }
    }
  }
}

template <typename T, typename S, bool kSwap>
__global__ void __launch_bounds__(kThreads)
    update_list_kernel(ListTable<3> table, const double* __restrict__ coeffs) {
  const int t = table.entry_tensor[blockIdx.x];
  update_block<T, S, /*kRecover=*/false, kSwap>(
      static_cast<T*>(table.ptr[0][t]), static_cast<UpdateGradPtr<T, kSwap>>(table.ptr[1][t]),
      static_cast<UpdateOtherPtr<S, kSwap>>(table.ptr[2][t]), coeffs, table.n[t],
      table.vec_ok[t], table.entry_block[blockIdx.x], table.nblocks[t]);
}

// The single-tensor op, looked up once (its schema is defined by the Python package
// elra_fused/ops before any list op can be called): the per-element path.
template <typename Fn>
c10::TypedOperatorHandle<Fn> single_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

bool on_one_device(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].device() != a[0].device() || b[i].device() != a[0].device()) return false;
  }
  return a[0].is_cuda();
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

// Stage 1 of dots_list for the elements `indices` (one dtype group): tables of small
// elements, single launches for large ones, each element into its own slots.
template <typename T, typename S>
void dots_list_partials(const DotsLists& lists, const std::vector<size_t>& indices,
                        const std::vector<int64_t>& slot0, const std::vector<int64_t>& nblocks,
                        double* partials, cudaStream_t stream) {
  ListTable<2> table;
  auto launch = [&] {
    if (table.entries == 0) return;
    dots_list_partial_kernel<T, S><<<table.entries, kThreads, 0, stream>>>(table, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table = ListTable<2>();
  };
  for (const size_t i : indices) {
    const at::Tensor& g = lists.grad[i];
    const at::Tensor& gp = lists.grad_prev[i];
    const bool vec_ok = aligned_pack<T, T>(g.const_data_ptr()) &&
                        aligned_pack<T, S>(gp.const_data_ptr());
    if (nblocks[i] > kListDirectBlocks) {
      const GPrevSrc<S, kPackN<T>, false> src{gp.const_data_ptr<S>(), nullptr, 0.0, 0.0};
      launch_dots_partials<T, S, false>(g.const_data_ptr<T>(), src, nullptr, g.numel(), vec_ok,
                                        partials + 2 * slot0[i], stream);
      continue;
    }
    const std::array<void*, 2> ptrs{const_cast<void*>(g.const_data_ptr()),
                                    const_cast<void*>(gp.const_data_ptr())};
    if (!table_add(table, ptrs, g.numel(), slot0[i], nblocks[i], vec_ok)) {
      launch();
      table_add(table, ptrs, g.numel(), slot0[i], nblocks[i], vec_ok);
    }
  }
  launch();
}

at::Tensor dots_list_cuda(at::TensorList grad, at::TensorList grad_prev) {
  const DotsLists lists = checked_dots_lists(grad, grad_prev, /*flatten=*/true);
  if (!on_one_device(lists.grad, lists.grad_prev)) {
    using DotsFn = at::Tensor(const at::Tensor&, const at::Tensor&);
    static const auto dots = single_op<DotsFn>("elra_fused::dots");
    at::Tensor total = dots.call(lists.grad[0], lists.grad_prev[0]);
    for (size_t i = 1; i < lists.grad.size(); ++i) {
      total.add_(dots.call(lists.grad[i], lists.grad_prev[i]));
    }
    return total;
  }
  const c10::cuda::CUDAGuard guard(lists.grad[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t count = lists.grad.size();
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
  FinishTable finish;
  bool starts_list = true;
  auto launch_finish = [&] {
    dots_list_finish_kernel<<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(),
                                                         finish, starts_list,
                                                         out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish = FinishTable();
    starts_list = false;
  };
  for (size_t i = 0; i < count; ++i) {
    finish.slot0[finish.count] = slot0[i];
    finish.nblocks[finish.count] = static_cast<int32_t>(nblocks[i]);
    if (++finish.count == kFinishTensors) launch_finish();
  }
  if (finish.count > 0) launch_finish();
  return out;
}

// update_list_ / update_swap_list_ for the elements `indices` (one dtype group).
template <typename T, typename S, bool kSwap>
void update_list_group(const UpdateLists& lists, const std::vector<size_t>& indices,
                       const double* coeffs, cudaStream_t stream) {
  ListTable<3> table;
  auto launch = [&] {
    if (table.entries == 0) return;
    update_list_kernel<T, S, kSwap><<<table.entries, kThreads, 0, stream>>>(table, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table = ListTable<3>();
  };
  for (const size_t i : indices) {
    const int64_t n = lists.x[i].numel();
    if (n == 0) continue;
    T* x = lists.x[i].data_ptr<T>();
    const auto g = typed_data<T, kSwap>(lists.grad[i]);
    const auto other = typed_data<S, !kSwap>(lists.grad_prev[i]);
    const int64_t nblocks = ceil_div(ceil_div(n, kPackN<T>), kThreads * kListPacksPerThread);
    if (nblocks > kListDirectBlocks) {
      launch_update<T, S, /*kRecover=*/false, kSwap>(x, g, other, coeffs, n, stream);
      continue;
    }
    const bool vec_ok = aligned_pack<T, T>(x) && aligned_pack<T, T>(g) &&
                        aligned_pack<T, S>(other);
    const std::array<void*, 3> ptrs{x, const_cast<T*>(g), const_cast<S*>(other)};
    if (!table_add(table, ptrs, n, 0, nblocks, vec_ok)) {
      launch();
      table_add(table, ptrs, n, 0, nblocks, vec_ok);
    }
  }
  launch();
}

// update_list_ / update_swap_list_ (kSwap; UpdateOp in common.h). check_update puts every
// element on coeffs' device, so the list is on one device.
template <bool kSwap>
void update_list_cuda(at::TensorList x, at::TensorList grad, at::TensorList grad_prev,
                      const at::Tensor& coeffs) {
  using Op = UpdateOp</*kRecover=*/false, kSwap>;
  const UpdateLists lists = checked_update_lists(Op::kListName, x, grad, grad_prev, coeffs,
                                                 Op::kCompactState, /*flatten=*/true);
  const c10::cuda::CUDAGuard guard(coeffs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* c = coeffs.const_data_ptr<double>();
  for (const auto& [dtypes, indices] : group_by_dtype(lists.x, lists.grad_prev)) {
    ELRA_DISPATCH_FLOAT_TYPES(dtypes.first, Op::kQualifiedListName, [&] {
      dispatch_other_type<scalar_t, Op::kCompactState>(dtypes.second, [&](auto* tag) {
        using S = std::remove_pointer_t<decltype(tag)>;
        update_list_group<scalar_t, S, kSwap>(lists, indices, c, stream);
      });
    });
  }
}

}  // namespace

ListImpls list_impls() {
  return {&dots_list_cuda, &update_list_cuda</*kSwap=*/false>, &update_list_cuda</*kSwap=*/true>};
}

}  // namespace elra::cuda
