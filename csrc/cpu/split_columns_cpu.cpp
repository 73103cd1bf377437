// CPU kernel of perturbdiff::split_columns: a CSR matrix [n, cols] split by column into a CSR
// matrix of the columns with position[k] < 0 (same shape, the other columns' entries removed) and a
// dense [n, dense_cols] matrix holding column k at position[k] (duplicates add up). The evaluator
// splits each block of cells so that genes stored in most cells go to a dense GEMM
// (evaluate/sparse_gram.py); one pass over the stored values instead of scipy's masks, fancy
// indexing and densification.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu/csr.h"

namespace perturbdiff::cpu {
namespace {

// Rows per task: a block of the evaluator (hundreds of cells) still splits across threads.
constexpr int64_t kGrainRows = 64;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_columns_cpu(
    const at::Tensor& ptr_, const at::Tensor& idx_, const at::Tensor& val_, const at::Tensor& position_,
    int64_t dense_cols) {
  for (const at::Tensor* t : {&ptr_, &idx_, &val_, &position_})
    TORCH_CHECK_VALUE(t->dim() == 1, "split_columns: ptr, idx, val and position must be 1-d, got ", t->sizes());
  TORCH_CHECK_VALUE(ptr_.size(0) >= 1, "split_columns: row pointers need at least one entry");
  TORCH_CHECK_VALUE(idx_.size(0) == val_.size(0), "split_columns: column indices and values differ in length");
  TORCH_CHECK_TYPE(position_.scalar_type() == at::kLong, "split_columns: position must be int64");
  TORCH_CHECK_TYPE(val_.scalar_type() == at::kFloat || val_.scalar_type() == at::kDouble,
                   "split_columns: values must be float32 or float64, got ", val_.scalar_type());
  const auto index_type = csr_index_type("split_columns", {&ptr_, &idx_});
  const at::Tensor ptr = ptr_.contiguous(), idx = idx_.contiguous(), val = val_.contiguous(),
                   position = position_.contiguous();
  const int64_t n = ptr.size(0) - 1, cols = position.size(0);
  const int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t k = 0; k < cols; ++k)
    TORCH_CHECK_VALUE(pos[k] < dense_cols, "split_columns: position[", k, "] = ", pos[k],
                      " is not below dense_cols (", dense_cols, ")");

  at::Tensor out_ptr = at::empty({n + 1}, ptr.options());
  at::Tensor dense = at::empty({n, dense_cols}, val.options());  // zeroed row by row by the thread filling it
  at::Tensor out_idx, out_val;
  AT_DISPATCH_INDEX_TYPES(index_type, "split_columns", [&] {
    const index_t *pp = ptr.data_ptr<index_t>(), *ip = idx.data_ptr<index_t>();
    check_csr("split_columns", "the matrix", pp, n, ip, idx.size(0), cols);
    index_t* op = out_ptr.data_ptr<index_t>();
    op[0] = 0;
    at::parallel_for(0, n, kGrainRows, [&](int64_t r0, int64_t r1) {  // kept entries per row
      for (int64_t r = r0; r < r1; ++r) {
        index_t kept = 0;
        for (index_t e = pp[r]; e < pp[r + 1]; ++e) kept += pos[ip[e]] < 0;
        op[r + 1] = kept;
      }
    });
    for (int64_t r = 0; r < n; ++r) op[r + 1] += op[r];
    out_idx = at::empty({static_cast<int64_t>(op[n])}, idx.options());
    out_val = at::empty({static_cast<int64_t>(op[n])}, val.options());
    index_t* oi = out_idx.data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "split_columns", [&] {
      const scalar_t* vp = val.data_ptr<scalar_t>();
      scalar_t *ov = out_val.data_ptr<scalar_t>(), *dp = dense.data_ptr<scalar_t>();
      at::parallel_for(0, n, kGrainRows, [&](int64_t r0, int64_t r1) {
        std::fill(dp + r0 * dense_cols, dp + r1 * dense_cols, scalar_t(0));
        for (int64_t r = r0; r < r1; ++r) {
          index_t out = op[r];
          for (index_t e = pp[r]; e < pp[r + 1]; ++e) {
            const int64_t to = pos[ip[e]];
            if (to < 0) {
              oi[out] = ip[e];
              ov[out++] = vp[e];
            } else {
              dp[r * dense_cols + to] += vp[e];
            }
          }
        }
      });
    });
  });
  return {out_ptr, out_idx, out_val, dense};
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("split_columns", &perturbdiff::cpu::split_columns_cpu); }
