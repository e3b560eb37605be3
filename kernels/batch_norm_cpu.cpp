// Training-mode batch norm (+ optional ReLU) for CPU tensors: C++/OpenMP, float32/float64; and a
// vectorised softplus (at the end of the file).
//
// Input x is N x C x S (S = product of the spatial sizes, NCHW-contiguous). Per channel c over
// its M = N*S values:
//   mean = sum(x)/M, var = sum((x - mean)^2)/M (two passes, partial sums per plane in the
//   tensor's type, accumulated in double), invstd = 1/sqrt(var + eps);
//   y = x*a + b with a = invstd*w, b = bias - mean*a (PyTorch's formulation), then max(y, 0) if
//   relu.
// Backward, with gm = g where y > 0 (relu; the mask is recomputed from x with the forward's exact
// arithmetic, so neither y nor a mask is saved) else g:
//   dbias = sum(gm), dw = sum(gm*(x - mean))*invstd,
//   dx = a*(gm - dbias/M - (x - mean)*invstd^2*sum(gm*(x - mean))/M).
//
// Why: PyTorch's CPU batch norm makes separate passes over memory for the statistics, the
// normalisation, the ReLU and (backward) the ReLU mask, the two reductions and the input
// gradient. Here one thread handles one channel at a time, so after the first pass the channel's
// planes (a few to a few hundred KiB) are read from cache: the forward reads x once and writes y,
// the backward reads g and x once and writes dx. 3-6x faster forward+backward on the CPU for the
// shapes of ATRC's head and HRNet in isolation, less inside a training step where the inputs come
// from DRAM (benchmarks/bench_batch_norm.py, benchmarks/RESULTS.md).
//
// Compiled with -ffp-contract=off so that the forward and the backward evaluate x*a + b the same
// way (no fused multiply-add in one loop and not the other): the recomputed ReLU mask is exact.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "scalar_math.h"

namespace {

template <typename T>
void forward_impl(const T* x, const T* w, const T* bias, T* y, T* mean_out, T* invstd_out, T* var_out,
                  int64_t N, int64_t C, int64_t S, double eps, bool relu) {
  const int64_t M = N * S;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        T a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t i = 0; i < S; ++i) a += p[i];
        sum += a;
      }
      const T m = static_cast<T>(sum / static_cast<double>(M));
      double ss = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        T a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t i = 0; i < S; ++i) {
          const T d = p[i] - m;
          a += d * d;
        }
        ss += a;
      }
      const double var = ss / static_cast<double>(M);
      const T is = static_cast<T>(1.0 / std::sqrt(var + eps));
      mean_out[c] = m;
      invstd_out[c] = is;
      var_out[c] = static_cast<T>(M > 1 ? ss / static_cast<double>(M - 1) : var);
      const T sc = is * w[c];
      const T sh = bias[c] - m * sc;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        T* q = y + (n * C + c) * S;
        if (relu) {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) {
            const T t = p[i] * sc + sh;
            q[i] = t > T(0) ? t : T(0);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) q[i] = p[i] * sc + sh;
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* g, const T* x, const T* w, const T* bias, const T* mean, const T* invstd, T* dx,
                   T* dw, T* db, int64_t N, int64_t C, int64_t S, bool relu) {
  const int64_t M = N * S;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T m = mean[c];
      const T is = invstd[c];
      const T sc = is * w[c];
      const T sh = bias[c] - m * sc;
      double sg = 0, sgx = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        const T* q = g + (n * C + c) * S;
        T a = 0, a2 = 0;
        if (relu) {
#pragma omp simd reduction(+ : a, a2)
          for (int64_t i = 0; i < S; ++i) {
            const T gm = (p[i] * sc + sh) > T(0) ? q[i] : T(0);
            a += gm;
            a2 += gm * (p[i] - m);
          }
        } else {
#pragma omp simd reduction(+ : a, a2)
          for (int64_t i = 0; i < S; ++i) {
            a += q[i];
            a2 += q[i] * (p[i] - m);
          }
        }
        sg += a;
        sgx += a2;
      }
      dw[c] = static_cast<T>(sgx * static_cast<double>(is));
      db[c] = static_cast<T>(sg);
      const T mg = static_cast<T>(sg / static_cast<double>(M));
      const T mgx = static_cast<T>(sgx / static_cast<double>(M));
      // dx = sc*(gm - mg - (x - m)*is^2*mgx) = k1*gm + k2*x + k3
      const T k1 = sc;
      const T k2 = -sc * is * is * mgx;
      const T k3 = -k2 * m - sc * mg;
      for (int64_t n = 0; n < N; ++n) {
        const T* p = x + (n * C + c) * S;
        const T* q = g + (n * C + c) * S;
        T* o = dx + (n * C + c) * S;
        if (relu) {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) {
            const T gm = (p[i] * sc + sh) > T(0) ? q[i] : T(0);
            o[i] = k1 * gm + k2 * p[i] + k3;
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) o[i] = k1 * q[i] + k2 * p[i] + k3;
        }
      }
    }
  });
}

// --- softplus -------------------------------------------------------------------------------
// y = x*beta > threshold ? x : log1p(exp(x*beta))/beta, PyTorch's definition, in one vectorised
// pass: PyTorch's CPU softplus calls the scalar log1p (about 5 ns per element; the global-context
// blocks' queries and keys go through it). For float: with t = x*beta and u = exp(-|t|) in (0, 1],
// log1p(exp(t)) = max(t, 0) + log1p(u); exp by Cephes' expf (scalar_math.h; u = 0 below the
// normal floats) and log1p(u) = 2*atanh(s), s = u/(2 + u) <= 1/3, by its series to s^15
// (truncation < 2e-9 relative): about 1 ulp from the float64 result. float64 uses
// std::log1p(std::exp(t)).

inline float log1p_exp(float t) {
  const float a = -std::fabs(t);
  const float u = a < -87.33f ? 0.0f : atrc_math::fast_exp(a);  // exp(a) below the normal floats: 0
  const float s = u / (2.0f + u);
  const float s2 = s * s;
  float q = 1.0f / 15.0f;
  q = q * s2 + 1.0f / 13.0f;
  q = q * s2 + 1.0f / 11.0f;
  q = q * s2 + 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  return (t > 0.0f ? t : 0.0f) + u * (2.0f * q) / (2.0f + u);  // 2*s*q, no denormal s
}

inline double log1p_exp(double t) { return std::log1p(std::exp(t)); }

template <typename T>
void softplus_impl(const T* x, T* y, int64_t N, int64_t L, int64_t x_batch_stride, T beta, T threshold) {
  constexpr int64_t CHUNK = 4096;
  const int64_t chunks = (L + CHUNK - 1) / CHUNK;
  at::parallel_for(0, N * chunks, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / chunks, lo = (i % chunks) * CHUNK, hi = std::min(L, lo + CHUNK);
      const T* p = x + n * x_batch_stride;
      T* q = y + n * L;
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) {
        const T t = p[j] * beta;
        q[j] = t > threshold ? p[j] : log1p_exp(t) / beta;
      }
    }
  });
}

// x: N x ... with contiguous samples (any batch stride, e.g. a channel slice of a larger
// tensor); returns a contiguous tensor of x's shape.
torch::Tensor softplus_forward(torch::Tensor x, double beta, double threshold) {
  TORCH_CHECK(x.device().is_cpu(), "softplus (cpp): CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "softplus (cpp): float32/float64 only");
  TORCH_CHECK(x.dim() >= 1 && (x.size(0) == 0 || x.select(0, 0).is_contiguous()),
              "softplus (cpp): each sample of the input must be contiguous");
  auto y = torch::empty(x.sizes(), x.options());
  const int64_t N = x.size(0);
  const int64_t L = N == 0 ? 0 : x.numel() / N;
  if (L == 0) return y;
  const int64_t bs = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softplus_forward", [&] {
    softplus_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, L, bs, static_cast<scalar_t>(beta),
                            static_cast<scalar_t>(threshold));
  });
  return y;
}

void check_input(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  TORCH_CHECK(x.device().is_cpu(), "batch_norm_act (cpp): CPU tensors only");
  TORCH_CHECK(x.dim() >= 2, "batch_norm_act (cpp): input must be N x C x ...");
  TORCH_CHECK(x.is_contiguous(), "batch_norm_act (cpp): input must be contiguous (NCHW)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "batch_norm_act (cpp): float32/float64 only");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
              "batch_norm_act (cpp): weight and bias must have the input's dtype");
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && w.numel() == x.size(1) && b.numel() == x.size(1),
              "batch_norm_act (cpp): weight and bias must be contiguous with C elements");
}

// Returns [y, mean, invstd, unbiased var] (the last three of C elements).
std::vector<torch::Tensor> bn_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps, bool relu) {
  check_input(x, w, b);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  auto y = torch::empty_like(x);
  auto mean = torch::empty({C}, x.options());
  auto invstd = torch::empty({C}, x.options());
  auto var = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_forward", [&] {
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
                           var.data_ptr<scalar_t>(), N, C, S, eps, relu);
  });
  return {y, mean, invstd, var};
}

// Returns [dx, dw, dbias].
std::vector<torch::Tensor> bn_backward(torch::Tensor g, torch::Tensor x, torch::Tensor w, torch::Tensor b,
                                       torch::Tensor mean, torch::Tensor invstd, bool relu) {
  check_input(x, w, b);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && g.is_contiguous(),
              "batch_norm_act (cpp): grad must be contiguous with the input's shape and dtype");
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  auto dx = torch::empty_like(x);
  auto dw = torch::empty({C}, x.options());
  auto db = torch::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward", [&] {
    backward_impl<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            b.data_ptr<scalar_t>(), mean.contiguous().data_ptr<scalar_t>(),
                            invstd.contiguous().data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(), N, C, S, relu);
  });
  return {dx, dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &bn_forward, "training-mode batch norm (+ReLU) forward: [y, mean, invstd, unbiased var]");
  m.def("backward", &bn_backward, "training-mode batch norm (+ReLU) backward: [dx, dweight, dbias]");
  m.def("softplus", &softplus_forward, "softplus(x, beta, threshold), PyTorch's definition, vectorised");
}
