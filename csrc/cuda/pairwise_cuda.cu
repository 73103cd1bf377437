// CUDA kernels of perturbdiff::pairwise_mmd and its backward: centred Z = [X; Y], Gram chunks by
// cuBLAS (at::bmm), the row epilogue of rows_epilogue.cuh, and per-row fp64 sums added in a fixed
// order. Unlike the CPU kernel it computes full (not triangular) Gram chunks; chunks are bounded
// (kGramBudget) so memory stays O(chunk) beyond the centred copy of the inputs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/rows_epilogue.cuh"
#include "op_args.h"
#include "saved_backward.h"

namespace perturbdiff::cuda {
namespace {

void check_cuda_float(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "perturbdiff: the CUDA kernel got tensors on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "perturbdiff: the CUDA kernels take float32 or float64, got ", x.scalar_type());
}

// Centred cells Zc [B, N, G], their squared norms (accumulated in fp64) and weights [B, N].
struct Pooled {
  at::Tensor z, norm, w;
  int64_t B, n, N, G;
};

Pooled pool(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xw, const at::Tensor& yw,
            const at::Tensor& center) {
  Pooled P;
  P.z = (at::cat({x, y}, 1) - center.unsqueeze(1)).contiguous();
  P.norm = P.z.square().sum(-1, false, at::kDouble).to(x.scalar_type()).contiguous();
  P.w = at::cat({xw, yw}, 1).contiguous();
  P.B = x.size(0), P.n = x.size(1), P.N = P.z.size(1), P.G = x.size(2);
  return P;
}

template <typename T>
RowsArgs<T> pooled_args(const Pooled& P, const at::Tensor& coef) {
  RowsArgs<T> a{};
  a.rows_total = a.C = P.N;
  a.row_norm = a.col_norm = P.norm.data_ptr<T>();
  a.row_w = a.col_w = P.w.data_ptr<T>();
  a.row_stride = a.col_stride = P.N;
  a.row_cells = a.col_cells = P.z.data_ptr<T>();
  a.genes = P.G;
  a.coef = coef.data_ptr<T>();
  a.split = P.n;
  a.self_pairs = true;
  a.scale = T(1);
  return a;
}

std::tuple<at::Tensor, at::Tensor> pairwise_mmd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& xw, const at::Tensor& yw,
                                                     const at::Tensor& coef_, const at::Tensor& center,
                                                     c10::string_view kernel, at::ArrayRef<double> bandwidths,
                                                     bool exclude_diag, bool save_weights) {
  check_pairwise_args(x, y, xw, yw, coef_, center);
  check_cuda_float(x);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Kernel k = parse_kernel(std::string(kernel));
  const Pooled P = pool(x, y, xw, yw, center);
  const at::Tensor coef = coef_.contiguous();
  at::Tensor saved = at::empty({save_weights ? P.B : 0, P.N, P.N}, x.options());
  at::Tensor row_sums = at::empty({P.B, P.N}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_mmd_cuda", [&] {
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    RowsArgs<scalar_t> a = pooled_args<scalar_t>(P, coef);
    a.exclude_diag = exclude_diag;
    a.saved = save_weights ? saved.data_ptr<scalar_t>() : nullptr;
    a.row_out = row_sums.data_ptr<double>();
    for_each_chunk(P.B, P.N, P.N, [&](int64_t b, int64_t sets, int64_t r0, int64_t rows) {
      at::Tensor zc = P.z.narrow(0, b, sets);
      at::Tensor gram = at::bmm(zc.narrow(1, r0, rows), zc.transpose(1, 2)).contiguous();
      a.gram = gram.data_ptr<scalar_t>();
      a.sets = sets, a.R = rows, a.set0 = b, a.r0 = r0;
      launch_rows_epilogue<scalar_t, false>(k, a, prm);
    });
  });
  if (save_weights) finish_laplacian(saved);
  return {row_sums.sum(1).to(x.scalar_type()), saved};
}

// Rows [start, start + len) of Z: grad = rowsum(M) * Zc - M Zc with M = 4 g c w w f'(D), by chunks.
at::Tensor recompute_rows(const Pooled& P, const at::Tensor& coef, const at::Tensor& grad, Kernel k,
                          at::ArrayRef<double> bandwidths, int64_t start, int64_t len) {
  at::Tensor out = at::empty({P.B, len, P.G}, P.z.options());
  at::Tensor row_sums = at::empty({P.B, P.N}, P.z.options().dtype(at::kDouble));
  const at::Tensor scale = (4 * grad).contiguous();
  AT_DISPATCH_FLOATING_TYPES(P.z.scalar_type(), "pairwise_mmd_backward_cuda", [&] {
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    RowsArgs<scalar_t> a = pooled_args<scalar_t>(P, coef);
    a.set_scale = scale.data_ptr<scalar_t>();
    a.row_out = row_sums.data_ptr<double>();
    for_each_chunk(P.B, len, P.N, [&](int64_t b, int64_t sets, int64_t r0, int64_t rows) {
      at::Tensor zc = P.z.narrow(0, b, sets);
      at::Tensor own = zc.narrow(1, start + r0, rows);
      at::Tensor m = at::bmm(own, zc.transpose(1, 2)).contiguous();
      a.gram = m.data_ptr<scalar_t>();
      a.sets = sets, a.R = rows, a.set0 = b, a.r0 = start + r0;
      launch_rows_epilogue<scalar_t, true>(k, a, prm);
      at::Tensor r = row_sums.narrow(0, b, sets).narrow(1, start + r0, rows).to(P.z.scalar_type()).unsqueeze(-1);
      out.narrow(0, b, sets).narrow(1, r0, rows).copy_(r * own - at::bmm(m, zc));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pairwise_mmd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& xw,
    const at::Tensor& yw, const at::Tensor& coef, const at::Tensor& center, c10::string_view kernel,
    at::ArrayRef<double> bandwidths, bool exclude_diag, const at::Tensor& saved, bool need_x,
    bool need_y) {
  check_pairwise_args(x, y, xw, yw, coef, center);
  check_cuda_float(x);
  check_shape(grad, "grad", {x.size(0)});
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Kernel k = parse_kernel(std::string(kernel));
  const at::Tensor g = grad.to(x.scalar_type());
  const at::Tensor none = at::empty({0}, x.options());
  if (saved.numel() > 0) {
    check_shape(saved, "saved", {x.size(0), x.size(1) + y.size(1), x.size(1) + y.size(1)});
    const at::Tensor c = center.unsqueeze(1);
    const at::Tensor xc = x - c, yc = y - c;
    return {need_x ? saved_backward_rows(g, saved, xc, yc, 0) : none,
            need_y ? saved_backward_rows(g, saved, xc, yc, 1) : none};
  }
  const Pooled P = pool(x, y, xw, yw, center);
  const at::Tensor cf = coef.contiguous();
  return {need_x ? recompute_rows(P, cf, g, k, bandwidths, 0, P.n) : none,
          need_y ? recompute_rows(P, cf, g, k, bandwidths, P.n, P.N - P.n) : none};
}

}  // namespace
}  // namespace perturbdiff::cuda

TORCH_LIBRARY_IMPL(perturbdiff, CUDA, m) {
  m.impl("pairwise_mmd", &perturbdiff::cuda::pairwise_mmd_cuda);
  m.impl("pairwise_mmd_backward", &perturbdiff::cuda::pairwise_mmd_backward_cuda);
}
