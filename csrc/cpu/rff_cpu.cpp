// Random Fourier feature set embeddings on the CPU. Semantics: perturbdiff/ops/rff.py
// (reference_embed_sums):
//   rff_embed(x [B,S,G], w [B,S], center [B,G], freq [G,F]) -> [B, 2F]
//   out[b] = sum_s w[b,s] [cos((x[b,s] - center[b]) freq), sin((x[b,s] - center[b]) freq)]
// at::parallel_for over tiles of cells; per tile one BLAS product (x_tile - c) @ freq, cos/sin by
// ATen's vectorised kernels, and a weighted column sum accumulated in fp64. The [S, F] feature
// matrix of a set is never stored: memory is O(threads x tile x F).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace perturbdiff {
namespace {

// A single tile runs inline: waking the thread pool for it costs more than it saves.
constexpr int64_t kGrainTiles = 2;

struct Tile {
  int64_t set, begin, rows;
};

// Row tiles of every set: at least two per thread when there are enough cells, and tall enough
// that the BLAS packing of freq (G x F, redone per product) stays small next to the
// 2 * rows * G * F flops of the tile.
std::vector<Tile> cell_tiles(int64_t sets, int64_t cells) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (sets * cells + 2 * threads - 1) / (2 * threads);
  const int64_t rows = std::clamp<int64_t>(want, 64, 512);
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < sets; ++b)
    for (int64_t s = 0; s < cells; s += rows) tiles.push_back({b, s, std::min(rows, cells - s)});
  return tiles;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& center,
                  const at::Tensor& freq) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be [sets, cells, genes], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(1), op,
              ": weights must be [sets, cells] = ", x.sizes().slice(0, 2), ", got ", w.sizes());
  TORCH_CHECK(center.dim() == 2 && center.size(0) == x.size(0) && center.size(1) == x.size(2), op,
              ": center must be [sets, genes] = [", x.size(0), ", ", x.size(2), "], got ", center.sizes());
  TORCH_CHECK(freq.dim() == 2 && freq.size(0) == x.size(2), op, ": frequencies must be [genes = ",
              x.size(2), ", F], got ", freq.sizes());
  for (const at::Tensor* t : {&w, &center, &freq}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all inputs must share x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": all inputs must be on x's device");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 inputs expected, got ", x.scalar_type());
}

// (x[b, begin:begin+rows] - center[b]) @ freq -> [rows, F]
at::Tensor project(const at::Tensor& x, const at::Tensor& center, const at::Tensor& freq, const Tile& t) {
  return at::mm(x[t.set].narrow(0, t.begin, t.rows) - center[t.set], freq);
}

at::Tensor rff_embed_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& center_in,
                         const at::Tensor& freq_in) {
  check_inputs("rff_embed", x_in, w_in, center_in, freq_in);
  // Detached: the ATen calls inside (also on worker threads) must not record autograd graphs.
  const at::Tensor x = x_in.detach().contiguous(), w = w_in.detach().contiguous(),
                   center = center_in.detach().contiguous(), freq = freq_in.detach().contiguous();
  const int64_t sets = x.size(0), nf = freq.size(1);
  const std::vector<Tile> tiles = cell_tiles(sets, x.size(1));
  // One fp64 row of partial sums per tile, combined below in tile order: bitwise reproducible.
  at::Tensor partial = at::zeros({static_cast<int64_t>(tiles.size()), 2 * nf}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rff_embed_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), kGrainTiles, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Tile& t = tiles[i];
        at::Tensor p = project(x, center, freq, t);
        const at::Tensor c = at::cos(p);
        p.sin_();
        const scalar_t* wt = w.data_ptr<scalar_t>() + t.set * x.size(1) + t.begin;
        const scalar_t* cp = c.data_ptr<scalar_t>();
        const scalar_t* sp = p.data_ptr<scalar_t>();
        double* acc = partial.data_ptr<double>() + i * 2 * nf;
        for (int64_t r = 0; r < t.rows; ++r) {
          const double wr = static_cast<double>(wt[r]);
          if (wr == 0.0) continue;  // padding
          for (int64_t f = 0; f < nf; ++f) {
            acc[f] += wr * cp[r * nf + f];
            acc[nf + f] += wr * sp[r * nf + f];
          }
        }
      }
    });
  });
  at::Tensor out = at::zeros({sets, 2 * nf}, partial.options());
  double* o = out.data_ptr<double>();
  const double* pp = partial.data_ptr<double>();
  for (size_t i = 0; i < tiles.size(); ++i)
    for (int64_t f = 0; f < 2 * nf; ++f) o[tiles[i].set * 2 * nf + f] += pp[i * 2 * nf + f];
  return out.to(x.scalar_type());
}

// grad_x[b,s] = w[b,s] (cos(p) * g_sin - sin(p) * g_cos) @ freq^T, the projection p recomputed per tile.
at::Tensor rff_embed_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                  const at::Tensor& center_in, const at::Tensor& freq_in) {
  check_inputs("rff_embed_backward", x_in, w_in, center_in, freq_in);
  const int64_t nf = freq_in.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == 2 * nf,
              "rff_embed_backward: grad must be [sets, 2F] = [", x_in.size(0), ", ", 2 * nf, "], got ",
              grad_in.sizes());
  // Detached: the ATen calls inside (also on worker threads) must not record autograd graphs.
  const at::Tensor x = x_in.detach().contiguous(), w = w_in.detach().contiguous(),
                   center = center_in.detach().contiguous(), freq = freq_in.detach().contiguous(),
                   grad = grad_in.detach().to(x.scalar_type()).contiguous();
  const at::Tensor freq_t = freq.t();
  at::Tensor grad_x = at::empty_like(x);
  const std::vector<Tile> tiles = cell_tiles(x.size(0), x.size(1));
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), kGrainTiles, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Tile& t = tiles[i];
      at::Tensor p = project(x, center, freq, t);
      const at::Tensor g = grad[t.set];
      at::Tensor h = at::cos(p).mul_(g.narrow(0, nf, nf));
      h.sub_(p.sin_().mul_(g.narrow(0, 0, nf)));
      h.mul_(w[t.set].narrow(0, t.begin, t.rows).unsqueeze(1));
      at::Tensor dst = grad_x[t.set].narrow(0, t.begin, t.rows);
      at::mm_out(dst, h, freq_t);
    }
  });
  return grad_x;
}

}  // namespace
}  // namespace perturbdiff

TORCH_LIBRARY_FRAGMENT(perturbdiff, m) {
  // Weighted sums of paired random Fourier features per set (see the top of this file).
  m.def("rff_embed(Tensor x, Tensor w, Tensor center, Tensor freq) -> Tensor");
  // Gradient w.r.t. x of sum(grad * rff_embed(x, w, center, freq)); w, center and freq are constants.
  m.def("rff_embed_backward(Tensor grad, Tensor x, Tensor w, Tensor center, Tensor freq) -> Tensor");
}

TORCH_LIBRARY_IMPL(perturbdiff, CPU, m) {
  m.impl("rff_embed", &perturbdiff::rff_embed_cpu);
  m.impl("rff_embed_backward", &perturbdiff::rff_embed_backward_cpu);
}
