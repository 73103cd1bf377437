// CPU kernels of perturbdiff::kme (kernel mean embedding at query points) and its backward: the
// rectangular instance of the pairwise engine (x tiles against query tiles z), same tiles, packing,
// BLAS Gram tiles and epilogues. Each item owns its output rows, so no reduction crosses threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/epilogue_dispatch.h"
#include "cpu/tiles.h"
#include "op_args.h"

namespace perturbdiff::cpu {
namespace {

// Inputs of one call, contiguous; tiles of x (block 0) first, then tiles of z (block 1).
template <typename T>
struct KmeProblem {
  at::Tensor x, xw, z, center;
  int64_t B, n, Q, G;
  std::vector<Span> tiles;
  int64_t x_tiles;

  KmeProblem(const at::Tensor& x_, const at::Tensor& xw_, const at::Tensor& z_, const at::Tensor& center_)
      : x(x_.contiguous()), xw(xw_.contiguous()), z(z_.contiguous()), center(center_.contiguous()),
        B(x_.size(0)), n(x_.size(1)), Q(z_.size(1)), G(x_.size(2)) {
    append_tiles(tiles, n, 0);
    x_tiles = static_cast<int64_t>(tiles.size());
    append_tiles(tiles, Q, 1);
  }

  SetRows<T> rows(int64_t b) const {
    return {{x.data_ptr<T>() + b * n * G, z.data_ptr<T>() + b * Q * G}, center.data_ptr<T>() + b * G, G};
  }
  int64_t tile_count() const { return static_cast<int64_t>(tiles.size()); }
};

// Items (set, tile) for every tile of one block.
template <typename T>
std::vector<std::pair<int64_t, int64_t>> items_of_block(const KmeProblem<T>& P, int block) {
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t t = 0; t < P.tile_count(); ++t)
      if (P.tiles[t].block == block) items.push_back({b, t});
  return items;
}

template <typename T>
at::Tensor forward(const KmeProblem<T>& P, Kernel kernel, const RadialParams<T>& prm) {
  at::Tensor out = at::empty({P.B, P.Q}, P.x.options());
  const auto items = items_of_block(P, 1);
  const EpilogueTable<T>& epi = epilogue<T>();
  for_each_item<T>(static_cast<int64_t>(items.size()), P.G, false, [&](Workspace<T>& ws, int64_t idx) {
    const auto [b, j] = items[idx];
    const Span& sj = P.tiles[j];
    std::vector<double> col(sj.len, 0.0);
    for (int64_t i = 0; i < P.x_tiles; ++i) {
      const Span& si = P.tiles[i];
      auto [a, c] = ws.operands(b, P.rows(b), i, si, j, sj);
      gram_tile(a.rows, si.len, c.rows, sj.len, P.G, ws.gram());
      const Tile<T> tile{ws.gram(), si.len, sj.len, sj.len, a.norm, c.norm,
                         P.xw.template data_ptr<T>() + b * P.n + si.start, nullptr, false,
                         a.rows, c.rows, P.G};
      epi.col_sum(kernel, prm, tile, col.data());
    }
    T* dst = out.data_ptr<T>() + b * P.Q + sj.start;
    for (int64_t q = 0; q < sj.len; ++q) dst[q] = static_cast<T>(col[q]);
  });
  return out;
}

// With M_iq = 2 g_q xw_i f'(D_iq): grad_x = rowsum(M) * Xc - M Zc (block 0 items) and
// grad_z = colsum(M) * Zc - M^T Xc (block 1 items), each item recomputing its Gram tiles.
template <typename T>
at::Tensor backward_block(const KmeProblem<T>& P, Kernel kernel, const RadialParams<T>& prm,
                          const at::Tensor& grad, int block) {
  const int64_t rows = block == 0 ? P.n : P.Q;
  at::Tensor out = at::empty({P.B, rows, P.G}, P.x.options());
  const auto items = items_of_block(P, block);
  const EpilogueTable<T>& epi = epilogue<T>();
  for_each_item<T>(static_cast<int64_t>(items.size()), P.G, true, [&](Workspace<T>& ws, int64_t idx) {
    const auto [b, own] = items[idx];
    const Span& so = P.tiles[own];
    T* acc = ws.accumulator();
    std::fill(acc, acc + so.len * P.G, T(0));
    std::vector<double> sums(so.len, 0.0);
    const int64_t first = block == 0 ? P.x_tiles : 0, last = block == 0 ? P.tile_count() : P.x_tiles;
    for (int64_t other = first; other < last; ++other) {
      const int64_t i = block == 0 ? own : other, j = block == 0 ? other : own;
      const Span &si = P.tiles[i], &sj = P.tiles[j];
      auto [a, c] = ws.operands(b, P.rows(b), i, si, j, sj);
      gram_tile(a.rows, si.len, c.rows, sj.len, P.G, ws.gram());
      const Tile<T> tile{ws.gram(), si.len, sj.len, sj.len, a.norm, c.norm,
                         P.xw.template data_ptr<T>() + b * P.n + si.start,
                         grad.data_ptr<T>() + b * P.Q + sj.start, false, a.rows, c.rows, P.G};
      epi.pair_grad(kernel, prm, tile, T(2), block == 0 ? sums.data() : nullptr,
                    block == 0 ? nullptr : sums.data());
      if (block == 0) {
        accumulate_product(acc, ws.gram(), si.len, sj.len, c.rows, P.G, false);
      } else {
        accumulate_product(acc, ws.gram(), sj.len, si.len, a.rows, P.G, true);
      }
    }
    const T* mine = ws.operands(b, P.rows(b), own, so, own, so).first.rows;
    T* dst = out.data_ptr<T>() + (b * rows + so.start) * P.G;
    for (int64_t p = 0; p < so.len; ++p) {
      const T s = static_cast<T>(sums[p]);
      for (int64_t k = 0; k < P.G; ++k) dst[p * P.G + k] = s * mine[p * P.G + k] - acc[p * P.G + k];
    }
  });
  return out;
}

at::Tensor kme_cpu(const at::Tensor& x, const at::Tensor& xw, const at::Tensor& z, const at::Tensor& center,
                   c10::string_view kernel, at::ArrayRef<double> bandwidths) {
  check_kme_args(x, xw, z, center);
  check_cpu_float(x);
  const Kernel k = parse_kernel(std::string(kernel));
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kme_cpu", [&] {
    return forward<scalar_t>(KmeProblem<scalar_t>(x, xw, z, center), k, radial_params<scalar_t>(k, bandwidths));
  });
}

std::tuple<at::Tensor, at::Tensor> kme_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& xw, const at::Tensor& z,
                                                    const at::Tensor& center, c10::string_view kernel,
                                                    at::ArrayRef<double> bandwidths, bool need_x, bool need_z) {
  check_kme_args(x, xw, z, center);
  check_cpu_float(x);
  check_shape(grad, "grad", {x.size(0), z.size(1)});
  const Kernel k = parse_kernel(std::string(kernel));
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kme_backward_cpu", [&] {
    KmeProblem<scalar_t> P(x, xw, z, center);
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    const at::Tensor g = grad.to(x.scalar_type()).contiguous();
    const at::Tensor none = at::empty({0}, x.options());
    return std::make_tuple(need_x ? backward_block<scalar_t>(P, k, prm, g, 0) : none,
                           need_z ? backward_block<scalar_t>(P, k, prm, g, 1) : none);
  });
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) {
  m.impl("kme", &perturbdiff::cpu::kme_cpu);
  m.impl("kme_backward", &perturbdiff::cpu::kme_backward_cpu);
}
