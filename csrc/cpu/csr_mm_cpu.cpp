// CPU kernel of perturbdiff::csr_mm: the dense product A @ B of two CSR matrices, A [N, K] and
// B [K, M]. The evaluator's Euclidean distances between cells need X Y^T for log1p expression that
// is a few percent non-zero, where a dense GEMM spends most of its multiply-adds on zeros.
// Semantics: A.to_dense() @ B.to_dense().
//
// Gustavson's row-by-row product with a dense accumulator: row r of the output gathers
// a_rk * B[k, :] over the stored a_rk, i.e. sum_k nnz(A[:, k]) nnz(B[k, :]) multiply-adds. Row r's
// output row (M values) is the accumulator, so threads own disjoint rows and the sums are
// bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/csr.h"

namespace perturbdiff::cpu {
namespace {

at::Tensor csr_mm_cpu(const at::Tensor& a_ptr, const at::Tensor& a_idx, const at::Tensor& a_val,
                      const at::Tensor& b_ptr, const at::Tensor& b_idx, const at::Tensor& b_val, int64_t M) {
  for (const at::Tensor* t : {&a_ptr, &a_idx, &a_val, &b_ptr, &b_idx, &b_val})
    TORCH_CHECK_VALUE(t->dim() == 1, "csr_mm: every CSR component must be 1-d, got ", t->sizes());
  TORCH_CHECK_VALUE(a_ptr.size(0) >= 1 && b_ptr.size(0) >= 1, "csr_mm: row pointers need at least one entry");
  TORCH_CHECK_VALUE(a_idx.size(0) == a_val.size(0) && b_idx.size(0) == b_val.size(0),
                    "csr_mm: column indices and values differ in length");
  TORCH_CHECK_VALUE(M >= 0, "csr_mm: m must be >= 0, got ", M);
  const auto index_type = csr_index_type("csr_mm", {&a_ptr, &a_idx, &b_ptr, &b_idx});
  TORCH_CHECK_TYPE(a_val.scalar_type() == b_val.scalar_type() &&
                       (a_val.scalar_type() == at::kFloat || a_val.scalar_type() == at::kDouble),
                   "csr_mm: values must both be float32 or both float64, got ", a_val.scalar_type(), " and ",
                   b_val.scalar_type());
  const at::Tensor ap = a_ptr.contiguous(), ai = a_idx.contiguous(), av = a_val.contiguous(),
                   bp = b_ptr.contiguous(), bi = b_idx.contiguous(), bv = b_val.contiguous();
  const int64_t N = ap.size(0) - 1, K = bp.size(0) - 1;
  at::Tensor out = at::empty({N, M}, av.options());

  AT_DISPATCH_INDEX_TYPES(index_type, "csr_mm", [&] {
    const index_t *app = ap.data_ptr<index_t>(), *aip = ai.data_ptr<index_t>(), *bpp = bp.data_ptr<index_t>(),
                  *bip = bi.data_ptr<index_t>();
    check_csr("csr_mm", "A", app, N, aip, ai.size(0), K);
    check_csr("csr_mm", "B", bpp, K, bip, bi.size(0), M);
    AT_DISPATCH_FLOATING_TYPES(av.scalar_type(), "csr_mm", [&] {
      const scalar_t *avp = av.data_ptr<scalar_t>(), *bvp = bv.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* o = op + r * M;
          std::fill(o, o + M, scalar_t(0));
          add_product_row(app, aip, avp, r, bpp, bip, bvp, o);
        }
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) { m.impl("csr_mm", &perturbdiff::cpu::csr_mm_cpu); }
