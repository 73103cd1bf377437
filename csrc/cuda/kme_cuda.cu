// CUDA kernels of perturbdiff::kme and its backward: Gram chunks queries x cells by cuBLAS, the row
// epilogue of rows_epilogue.cuh over the cells of each query, GEMMs for the gradients.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/rows_epilogue.cuh"
#include "op_args.h"

namespace perturbdiff::cuda {
namespace {

// Centred cells and queries with their squared norms (fp64 accumulation).
struct Centred {
  at::Tensor x, z, x_norm, z_norm, xw;
  int64_t B, n, Q, G;
};

Centred centre(const at::Tensor& x, const at::Tensor& xw, const at::Tensor& z, const at::Tensor& center) {
  TORCH_CHECK_VALUE(x.is_cuda(), "perturbdiff: the CUDA kernel got tensors on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "perturbdiff: the CUDA kernels take float32 or float64, got ", x.scalar_type());
  Centred c;
  const at::Tensor ctr = center.unsqueeze(1);
  c.x = (x - ctr).contiguous();
  c.z = (z - ctr).contiguous();
  c.x_norm = c.x.square().sum(-1, false, at::kDouble).to(x.scalar_type()).contiguous();
  c.z_norm = c.z.square().sum(-1, false, at::kDouble).to(x.scalar_type()).contiguous();
  c.xw = xw.contiguous();
  c.B = x.size(0), c.n = x.size(1), c.Q = z.size(1), c.G = x.size(2);
  return c;
}

// Rows are queries, columns are cells; no blocks, no self-pairs.
template <typename T>
RowsArgs<T> query_args(const Centred& c) {
  RowsArgs<T> a{};
  a.C = c.n;
  a.rows_total = c.Q;
  a.row_norm = c.z_norm.data_ptr<T>();
  a.col_norm = c.x_norm.data_ptr<T>();
  a.col_w = c.xw.data_ptr<T>();
  a.row_stride = c.Q;
  a.col_stride = c.n;
  a.row_cells = c.z.data_ptr<T>();
  a.col_cells = c.x.data_ptr<T>();
  a.genes = c.G;
  a.split = c.Q + c.n;  // never reached: one block
  a.scale = T(1);
  return a;
}

at::Tensor kme_cuda(const at::Tensor& x, const at::Tensor& xw, const at::Tensor& z, const at::Tensor& center,
                    c10::string_view kernel, at::ArrayRef<double> bandwidths) {
  check_kme_args(x, xw, z, center);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Kernel k = parse_kernel(std::string(kernel));
  const Centred c = centre(x, xw, z, center);
  at::Tensor sums = at::empty({c.B, c.Q}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kme_cuda", [&] {
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    RowsArgs<scalar_t> a = query_args<scalar_t>(c);
    a.row_out = sums.data_ptr<double>();
    for_each_chunk(c.B, c.Q, c.n, [&](int64_t b, int64_t sets, int64_t r0, int64_t rows) {
      at::Tensor gram =
          at::bmm(c.z.narrow(0, b, sets).narrow(1, r0, rows), c.x.narrow(0, b, sets).transpose(1, 2)).contiguous();
      a.gram = gram.data_ptr<scalar_t>();
      a.sets = sets, a.R = rows, a.set0 = b, a.r0 = r0;
      launch_rows_epilogue<scalar_t, false>(k, a, prm);
    });
  });
  return sums.to(x.scalar_type());
}

// With M_qi = 2 g_q xw_i f'(D_qi): grad_z = rowsum(M) * Zc - M Xc, grad_x = colsum(M) * Xc - M^T Zc.
std::tuple<at::Tensor, at::Tensor> kme_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& xw, const at::Tensor& z,
                                                     const at::Tensor& center, c10::string_view kernel,
                                                     at::ArrayRef<double> bandwidths, bool need_x, bool need_z) {
  check_kme_args(x, xw, z, center);
  check_shape(grad, "grad", {x.size(0), z.size(1)});
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Kernel k = parse_kernel(std::string(kernel));
  const Centred c = centre(x, xw, z, center);
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  at::Tensor gx = need_x ? at::zeros_like(c.x) : at::empty({0}, x.options());
  at::Tensor gz = need_z ? at::empty_like(c.z) : at::empty({0}, x.options());
  at::Tensor sums = at::empty({c.B, c.Q}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kme_backward_cuda", [&] {
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    RowsArgs<scalar_t> a = query_args<scalar_t>(c);
    a.row_w = g.data_ptr<scalar_t>();
    a.scale = scalar_t(2);
    a.row_out = sums.data_ptr<double>();
    for_each_chunk(c.B, c.Q, c.n, [&](int64_t b, int64_t sets, int64_t r0, int64_t rows) {
      at::Tensor zq = c.z.narrow(0, b, sets).narrow(1, r0, rows);
      at::Tensor xs = c.x.narrow(0, b, sets);
      at::Tensor m = at::bmm(zq, xs.transpose(1, 2)).contiguous();
      a.gram = m.data_ptr<scalar_t>();
      a.sets = sets, a.R = rows, a.set0 = b, a.r0 = r0;
      launch_rows_epilogue<scalar_t, true>(k, a, prm);
      if (need_z) {
        at::Tensor r = sums.narrow(0, b, sets).narrow(1, r0, rows).to(x.scalar_type()).unsqueeze(-1);
        gz.narrow(0, b, sets).narrow(1, r0, rows).copy_(r * zq - at::bmm(m, xs));
      }
      if (need_x) {
        gx.narrow(0, b, sets).add_(m.sum(1).unsqueeze(-1) * xs - at::bmm(m.transpose(1, 2), zq));
      }
    });
  });
  return {gx, gz};
}

}  // namespace
}  // namespace perturbdiff::cuda

TORCH_LIBRARY_IMPL(perturbdiff, CUDA, m) {
  m.impl("kme", &perturbdiff::cuda::kme_cuda);
  m.impl("kme_backward", &perturbdiff::cuda::kme_backward_cuda);
}
