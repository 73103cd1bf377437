// Random Fourier feature set embeddings on CUDA (schemas: csrc/cpu/rff_cpu.cpp; semantics:
// perturbdiff/ops/rff.py, reference_embed_sums). Cells are processed in chunks: per chunk one
// batched cuBLAS product (x_chunk - c) @ freq, then one kernel applies sincos and adds the weighted
// column sums into an fp64 accumulator owned column by column by one thread (no atomics:
// deterministic). Peak extra memory is one [B, chunk, F] projection, not [B, S, F].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace perturbdiff {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElements = int64_t(1) << 25;  // projection chunk: 128 MiB in fp32

int64_t chunk_rows(int64_t sets, int64_t cells, int64_t nf) {
  return std::clamp<int64_t>(kChunkElements / std::max<int64_t>(1, sets * nf), 1, std::max<int64_t>(1, cells));
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& center,
                  const at::Tensor& freq) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && center.dim() == 2 && freq.dim() == 2, op,
              ": expected x [sets, cells, genes], w [sets, cells], center [sets, genes], freq [genes, F]");
  TORCH_CHECK(w.size(0) == x.size(0) && w.size(1) == x.size(1) && center.size(0) == x.size(0) &&
                  center.size(1) == x.size(2) && freq.size(0) == x.size(2),
              op, ": shapes disagree: x ", x.sizes(), ", w ", w.sizes(), ", center ", center.sizes(),
              ", freq ", freq.sizes());
  for (const at::Tensor* t : {&w, &center, &freq}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": all inputs must share x's dtype and device");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 inputs expected, got ", x.scalar_type());
}

// acc[b, f] += sum_r w[b, r] cos(p[b, r, f]); acc[b, F + f] += ... sin. One thread per (b, f).
template <typename scalar_t>
__global__ void accumulate_cos_sin(const scalar_t* __restrict__ p, const scalar_t* __restrict__ w,
                                   double* __restrict__ acc, int64_t rows, int64_t nf, int64_t w_stride) {
  const int64_t f = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (f >= nf) return;
  double c_sum = 0.0, s_sum = 0.0;
  const scalar_t* pb = p + b * rows * nf;
  for (int64_t r = 0; r < rows; ++r) {
    const double wr = static_cast<double>(w[b * w_stride + r]);
    scalar_t s, c;
    sincos(pb[r * nf + f], &s, &c);
    c_sum += wr * static_cast<double>(c);
    s_sum += wr * static_cast<double>(s);
  }
  acc[b * 2 * nf + f] += c_sum;
  acc[b * 2 * nf + nf + f] += s_sum;
}

// p <- w[b, r] * (cos(p) * g_sin[b, f] - sin(p) * g_cos[b, f]), in place.
template <typename scalar_t>
__global__ void gradient_coefficients(scalar_t* __restrict__ p, const scalar_t* __restrict__ w,
                                      const scalar_t* __restrict__ grad, int64_t rows, int64_t nf,
                                      int64_t w_stride, int64_t total) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t f = i % nf, r = (i / nf) % rows, b = i / (nf * rows);
  scalar_t s, c;
  sincos(p[i], &s, &c);
  p[i] = w[b * w_stride + r] * (c * grad[b * 2 * nf + nf + f] - s * grad[b * 2 * nf + f]);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& center, const at::Tensor& freq, int64_t begin,
                   int64_t rows) {
  return at::matmul(x.narrow(1, begin, rows) - center.unsqueeze(1), freq);
}

at::Tensor rff_embed_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& center_in,
                          const at::Tensor& freq_in) {
  check_inputs("rff_embed", x_in, w_in, center_in, freq_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Detached: the ATen calls inside (also on worker threads) must not record autograd graphs.
  const at::Tensor x = x_in.detach().contiguous(), w = w_in.detach().contiguous(),
                   center = center_in.detach().contiguous(), freq = freq_in.detach().contiguous();
  const int64_t sets = x.size(0), cells = x.size(1), nf = freq.size(1);
  at::Tensor acc = at::zeros({sets, 2 * nf}, x.options().dtype(at::kDouble));
  const int64_t step = chunk_rows(sets, cells, nf);
  const dim3 grid((nf + kThreads - 1) / kThreads, sets);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < cells; begin += step) {
    const int64_t rows = std::min(step, cells - begin);
    const at::Tensor p = project(x, center, freq, begin, rows).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rff_embed_cuda", [&] {
      accumulate_cos_sin<scalar_t><<<grid, kThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), w.data_ptr<scalar_t>() + begin, acc.data_ptr<double>(), rows, nf, cells);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return acc.to(x.scalar_type());
}

at::Tensor rff_embed_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
                                   const at::Tensor& center_in, const at::Tensor& freq_in) {
  check_inputs("rff_embed_backward", x_in, w_in, center_in, freq_in);
  const int64_t sets = x_in.size(0), cells = x_in.size(1), nf = freq_in.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == sets && grad_in.size(1) == 2 * nf,
              "rff_embed_backward: grad must be [sets, 2F] = [", sets, ", ", 2 * nf, "], got ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Detached: the ATen calls inside (also on worker threads) must not record autograd graphs.
  const at::Tensor x = x_in.detach().contiguous(), w = w_in.detach().contiguous(),
                   center = center_in.detach().contiguous(), freq = freq_in.detach().contiguous(),
                   grad = grad_in.detach().to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  const int64_t step = chunk_rows(sets, cells, nf);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < cells; begin += step) {
    const int64_t rows = std::min(step, cells - begin);
    at::Tensor h = project(x, center, freq, begin, rows).contiguous();
    const int64_t total = h.numel();
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rff_embed_backward_cuda", [&] {
      gradient_coefficients<scalar_t><<<blocks, kThreads, 0, stream>>>(
          h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>() + begin, grad.data_ptr<scalar_t>(), rows, nf, cells,
          total);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_x.narrow(1, begin, rows).copy_(at::matmul(h, freq.t()));  // the one GEMM with freq
  }
  return grad_x;
}

}  // namespace
}  // namespace perturbdiff

TORCH_LIBRARY_IMPL(perturbdiff, CUDA, m) {
  m.impl("rff_embed", &perturbdiff::rff_embed_cuda);
  m.impl("rff_embed_backward", &perturbdiff::rff_embed_backward_cuda);
}
