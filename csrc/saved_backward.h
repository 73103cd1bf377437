// The matrix pairwise_mmd saves for its backward and the backward that uses it. With
// W_pq = c w_p w_q f'(D_pq) (self-pairs 0) the gradient is grad_Z = 4 g (diag(W 1) - W) Z, so the
// forward stores the Laplacian L = diag(W 1) - W [B, N, N] and the backward is two batched GEMMs
// per block of rows, nothing else. Plain ATen calls, used by the CUDA kernel; the CPU kernel does the
// same in place and by cache-sized blocks of genes (pairwise_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

namespace perturbdiff {

// `saved` holds -W with a zero diagonal; sets the diagonal to the row sums of W, making it L.
inline void finish_laplacian(at::Tensor& saved) {
  saved.diagonal(0, 1, 2).copy_(-saved.sum(2, /*keepdim=*/false, at::kDouble).to(saved.scalar_type()));
}

// Gradient w.r.t. the rows of x (block 0) or y (block 1): 4 g L[rows] [Xc; Yc]. L 1 = 0 makes the
// product translation invariant, but its fp32 rounding is not: on uncentred log-expression the
// products carry the offset and the error grows with offset / spread, hence the centred xc, yc.
inline at::Tensor saved_backward_rows(const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& xc,
                                      const at::Tensor& yc, int block) {
  const int64_t B = xc.size(0), n = xc.size(1), m = yc.size(1);
  const at::Tensor rows = saved.narrow(1, block == 0 ? 0 : n, block == 0 ? n : m) * (4 * grad).view({B, 1, 1});
  return at::bmm(rows.narrow(2, 0, n), xc).baddbmm_(rows.narrow(2, n, m), yc);
}

}  // namespace perturbdiff
