// CPU kernels of perturbdiff::pairwise_mmd and its backward.
//
// Z = [X; Y] of each set is cut into row tiles that never straddle X and Y; only tile pairs I <= J
// are computed (off-diagonal pairs count twice). Per pair: pack both tiles centred into the thread's
// buffers, one BLAS Gram tile, one vectorised epilogue over every bandwidth; each pair's fp64 partial
// sum goes to its own slot and the slots are added in a fixed order, so results are bitwise
// reproducible whatever the thread schedule.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/epilogue_dispatch.h"
#include "cpu/tiles.h"
#include "op_args.h"

namespace perturbdiff::cpu {
namespace {

// Inputs of one call, contiguous, with the row tiles of a set (X tiles first, then Y tiles).
template <typename T>
struct Problem {
  at::Tensor x, y, xw, yw, coef, center;
  int64_t B, n, m, G;
  std::vector<Span> tiles;

  Problem(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& xw_, const at::Tensor& yw_,
          const at::Tensor& coef_, const at::Tensor& center_)
      : x(x_.contiguous()), y(y_.contiguous()), xw(xw_.contiguous()), yw(yw_.contiguous()),
        coef(coef_.contiguous()), center(center_.contiguous()),
        B(x_.size(0)), n(x_.size(1)), m(y_.size(1)), G(x_.size(2)) {
    append_tiles(tiles, n, 0);
    append_tiles(tiles, m, 1);
  }

  int64_t N() const { return n + m; }
  SetRows<T> rows(int64_t b) const {
    return {{x.data_ptr<T>() + b * n * G, y.data_ptr<T>() + b * m * G}, center.data_ptr<T>() + b * G, G};
  }
  const T* weights(int64_t b, const Span& s) const {
    return (s.block == 0 ? xw.data_ptr<T>() + b * n : yw.data_ptr<T>() + b * m) + s.start;
  }
  // Block coefficient c_xx, c_xy or c_yy of a tile pair.
  T coefficient(int64_t b, const Span& a, const Span& c) const {
    return coef.data_ptr<T>()[b * 3 + a.block + c.block];
  }
  int64_t z_row(const Span& s) const { return s.block * n + s.start; }  // first row inside Z
};

struct TilePair {
  int64_t set;
  int64_t i, j;  // tile indices, i <= j
};

// finish_laplacian (saved_backward.h) without its fp64 copy of the whole matrix: each row is summed
// in double in place.
template <typename T>
void finish_laplacian_rows(at::Tensor& saved) {
  const int64_t N = saved.size(1), rows = saved.size(0) * N;
  T* data = saved.data_ptr<T>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = data + r * N;
      double s = 0.0;
      for (int64_t q = 0; q < N; ++q) s += row[q];
      row[r % N] = static_cast<T>(-s);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward(const Problem<T>& P, Kernel kernel,
                                           const RadialParams<T>& prm, bool exclude_diag, bool save) {
  const int64_t T_count = static_cast<int64_t>(P.tiles.size()), N = P.N();
  std::vector<TilePair> pairs;
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t i = 0; i < T_count; ++i)
      for (int64_t j = i; j < T_count; ++j) pairs.push_back({b, i, j});
  std::vector<double> partial(pairs.size());
  at::Tensor saved = at::empty({save ? P.B : 0, N, N}, P.x.options());
  T* saved_data = save ? saved.data_ptr<T>() : nullptr;
  const EpilogueTable<T>& epi = epilogue<T>();
  // Whole sets per thread when there are enough of them to balance (each tile is packed once).
  const int64_t per_set = T_count * (T_count + 1) / 2;
  const int64_t run = P.B >= 2 * at::get_num_threads() ? per_set : 1;

  for_each_item<T>(static_cast<int64_t>(pairs.size()), P.G, false, [&](Workspace<T>& ws, int64_t idx) {
    const TilePair& pr = pairs[idx];
    const Span &si = P.tiles[pr.i], &sj = P.tiles[pr.j];
    auto [a, c] = ws.operands(pr.set, P.rows(pr.set), pr.i, si, pr.j, sj);
    gram_tile(a.rows, si.len, c.rows, sj.len, P.G, ws.gram());
    const Tile<T> tile{ws.gram(), si.len, sj.len, sj.len, a.norm, c.norm,
                       P.weights(pr.set, si), P.weights(pr.set, sj), pr.i == pr.j,
                       a.rows, c.rows, P.G};
    const T coef = P.coefficient(pr.set, si, sj);
    T* s = save ? saved_data + pr.set * N * N + P.z_row(si) * N + P.z_row(sj) : nullptr;
    const double v = epi.pair_sum(kernel, prm, tile, exclude_diag, s, N, -coef);  // -W, see saved_backward.h
    if (s != nullptr && pr.i != pr.j) {  // the skipped mirror tile is the transpose
      T* mirror = saved_data + pr.set * N * N + P.z_row(sj) * N + P.z_row(si);
      for (int64_t p = 0; p < si.len; ++p)
        for (int64_t q = 0; q < sj.len; ++q) mirror[q * N + p] = s[p * N + q];
    }
    partial[idx] = (pr.i == pr.j ? 1.0 : 2.0) * static_cast<double>(coef) * v;
  }, run);

  if (save) finish_laplacian_rows<T>(saved);
  at::Tensor value = at::empty({P.B}, P.x.options());
  T* out = value.data_ptr<T>();
  for (int64_t b = 0; b < P.B; ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < per_set; ++k) sum += partial[b * per_set + k];
    out[b] = static_cast<T>(sum);
  }
  return {value, saved};
}

// Gradient by recomputation: each item owns one row tile I of one set and loops over every tile J:
// Gram tile, M = 4 g c w w f'(D), rowsum(M) and acc += M Zc_J; then grad_I = rowsum * Zc_I - acc.
template <typename T>
at::Tensor backward_recompute_rows(const Problem<T>& P, Kernel kernel, const RadialParams<T>& prm,
                                   const at::Tensor& grad, int block) {
  const int64_t rows = block == 0 ? P.n : P.m, T_count = static_cast<int64_t>(P.tiles.size());
  at::Tensor out = at::empty({P.B, rows, P.G}, P.x.options());
  std::vector<std::pair<int64_t, int64_t>> items;  // (set, tile)
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t i = 0; i < T_count; ++i)
      if (P.tiles[i].block == block) items.push_back({b, i});
  const T* g = grad.data_ptr<T>();
  const EpilogueTable<T>& epi = epilogue<T>();

  for_each_item<T>(static_cast<int64_t>(items.size()), P.G, true, [&](Workspace<T>& ws, int64_t idx) {
    const auto [b, i] = items[idx];
    const Span& si = P.tiles[i];
    T* acc = ws.accumulator();
    std::fill(acc, acc + si.len * P.G, T(0));
    std::vector<double> row_sum(si.len, 0.0);
    for (int64_t j = 0; j < T_count; ++j) {
      const Span& sj = P.tiles[j];
      auto [a, c] = ws.operands(b, P.rows(b), i, si, j, sj);
      gram_tile(a.rows, si.len, c.rows, sj.len, P.G, ws.gram());
      const Tile<T> tile{ws.gram(), si.len, sj.len, sj.len, a.norm, c.norm,
                         P.weights(b, si), P.weights(b, sj), i == j, a.rows, c.rows, P.G};
      epi.pair_grad(kernel, prm, tile, T(4) * g[b] * P.coefficient(b, si, sj), row_sum.data(), nullptr);
      accumulate_product(acc, ws.gram(), si.len, sj.len, c.rows, P.G, false);
    }
    const T* zi = ws.operands(b, P.rows(b), i, si, i, si).first.rows;
    T* dst = out.data_ptr<T>() + (b * rows + si.start) * P.G;
    for (int64_t p = 0; p < si.len; ++p) {
      const T r = static_cast<T>(row_sum[p]);
      for (int64_t k = 0; k < P.G; ++k) dst[p * P.G + k] = r * zi[p * P.G + k] - acc[p * P.G + k];
    }
  });
  return out;
}

// Gradient from the saved Laplacian: grad_Z = 4 g L Zc, block by block of genes. Each item centres
// one [N, kGeneChunk] slice of Z = [X; Y] into a cache-resident buffer and writes the matching
// columns of the gradients with one GEMM per block, so Zc is never materialised (see
// saved_backward.h for why the products take centred cells).
constexpr int64_t kGeneChunk = 512;

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_saved(const Problem<T>& P, const at::Tensor& grad,
                                                  const at::Tensor& saved, bool need_x, bool need_y) {
  const int64_t N = P.N(), chunks = (P.G + kGeneChunk - 1) / kGeneChunk;
  at::Tensor gx = at::empty({need_x ? P.B : 0, P.n, P.G}, P.x.options());
  at::Tensor gy = at::empty({need_y ? P.B : 0, P.m, P.G}, P.x.options());
  const T* g = grad.data_ptr<T>();
  const EpilogueTable<T>& epi = epilogue<T>();
  at::parallel_for(0, P.B * chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor zc = at::empty({N, kGeneChunk}, P.x.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, k0 = (item % chunks) * kGeneChunk;
      const int64_t kc = std::min(kGeneChunk, P.G - k0);
      // Centre the slice row by row (the pack routine on a [1, kc] row with stride G).
      T* dst = zc.data_ptr<T>();
      const SetRows<T> rows = P.rows(b);
      for (int64_t r = 0; r < N; ++r) {
        const T* src = (r < P.n ? rows.block[0] + r * P.G : rows.block[1] + (r - P.n) * P.G) + k0;
        epi.pack_centered(src, rows.center + k0, 1, kc, dst + r * kc, nullptr);
      }
      const at::Tensor slice = at::from_blob(dst, {N, kc}, P.x.options());
      const double alpha = 4.0 * static_cast<double>(g[b]);
      for (int block = 0; block < 2; ++block) {
        if (!(block == 0 ? need_x : need_y)) continue;
        at::Tensor out = (block == 0 ? gx : gy)[b].narrow(1, k0, kc);  // strided view, ld = G
        const at::Tensor L = saved[b].narrow(0, block == 0 ? 0 : P.n, block == 0 ? P.n : P.m);
        at::addmm_out(out, out, L, slice, /*beta=*/0, alpha);
      }
    }
  });
  return {gx, gy};
}

std::tuple<at::Tensor, at::Tensor> pairwise_mmd_cpu(const at::Tensor& x, const at::Tensor& y,
                                                    const at::Tensor& xw, const at::Tensor& yw,
                                                    const at::Tensor& coef, const at::Tensor& center,
                                                    c10::string_view kernel, at::ArrayRef<double> bandwidths,
                                                    bool exclude_diag, bool save_weights) {
  check_pairwise_args(x, y, xw, yw, coef, center);
  check_cpu_float(x);
  const Kernel k = parse_kernel(std::string(kernel));
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_mmd_cpu", [&] {
    Problem<scalar_t> P(x, y, xw, yw, coef, center);
    return forward<scalar_t>(P, k, radial_params<scalar_t>(k, bandwidths), exclude_diag, save_weights);
  });
}

std::tuple<at::Tensor, at::Tensor> pairwise_mmd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& xw,
    const at::Tensor& yw, const at::Tensor& coef, const at::Tensor& center, c10::string_view kernel,
    at::ArrayRef<double> bandwidths, bool exclude_diag, const at::Tensor& saved, bool need_x,
    bool need_y) {
  check_pairwise_args(x, y, xw, yw, coef, center);
  check_cpu_float(x);
  check_shape(grad, "grad", {x.size(0)});
  const Kernel k = parse_kernel(std::string(kernel));
  const int64_t N = x.size(1) + y.size(1);
  const bool use_saved = saved.numel() > 0;
  if (use_saved) check_shape(saved, "saved", {x.size(0), N, N});
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_mmd_backward_cpu", [&] {
    Problem<scalar_t> P(x, y, xw, yw, coef, center);
    const at::Tensor g = grad.to(x.scalar_type()).contiguous();
    const at::Tensor none = at::empty({0}, x.options());
    if (use_saved) {
      auto [gx, gy] = backward_saved<scalar_t>(P, g, saved.contiguous(), need_x, need_y);
      return std::make_tuple(need_x ? gx : none, need_y ? gy : none);
    }
    const auto prm = radial_params<scalar_t>(k, bandwidths);
    return std::make_tuple(need_x ? backward_recompute_rows<scalar_t>(P, k, prm, g, 0) : none,
                           need_y ? backward_recompute_rows<scalar_t>(P, k, prm, g, 1) : none);
  });
}

}  // namespace
}  // namespace perturbdiff::cpu

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) {
  m.impl("pairwise_mmd", &perturbdiff::cpu::pairwise_mmd_cpu);
  m.impl("pairwise_mmd_backward", &perturbdiff::cpu::pairwise_mmd_backward_cpu);
}
