// Bilinear upsampling fused into the cross-entropy, for CPU tensors: C++/OpenMP, float32/float64.
//
// Inputs: x, low-resolution class logits B x C x h x w (contiguous), y the class index of every
// full-resolution pixel (B x H x W, int64), and either wt, its weight (B x H x W, x's type; 0 for
// ignored pixels; y then in [0, C) everywhere), or (wt absent) the ignore index and optional class
// weights cw (C): the weight is 0 where y equals the ignore index, else cw[y] (or 1). The logits of full-resolution pixel (i, j) are PyTorch's
// bilinear interpolation with align_corners=False (F.interpolate(x, size=(H, W)):
//   src = max((h / H) * (i + 0.5) - 0.5, 0), i0 = min(floor(src), h - 1), i1 = min(i0 + 1, h - 1),
//   l1 = min(src - i0, 1), l0 = 1 - l1 (the same along the width),
//   z = l0h * (l0w * x[i0, j0] + l1w * x[i0, j1]) + l1h * (l0w * x[i1, j0] + l1w * x[i1, j1]).
// Forward: lse = log sum_c exp(z_c) (max-subtracted), total = sum over pixels of wt * (lse - z_y)
// (per-row partial sums in double, added in row order: deterministic); lse is saved.
// Backward (g = d total): dz_c = g * wt * (exp(z_c - lse) - [c == y]), scattered back to the low
// resolution with the same bilinear weights (the adjoint of the interpolation): first every
// output row's dz is reduced along the width into a B x H x w x C buffer, then each low-resolution
// row sums the output rows that read it, in row order (no atomics, deterministic).
//
// Why: the full-resolution logits (B x C x H x W: 15.7 MB for 2 x 40 x 192 x 256) are never
// written: PyTorch's path writes them (upsample), reads them and writes log-probabilities
// (log-softmax), reads those twice and writes the gradient (backward) and reads that again
// (upsample backward). Here the forward and backward each read the 16x smaller low-resolution map
// from cache.
//
// exp in float32 is a vectorisable Cephes-style approximation (scalar_math.h; relative error
// ~1e-7, i.e. float rounding); float64 uses std::exp.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bilinear_axis.h"
#include "scalar_math.h"

namespace {

using atrc_math::fast_exp;  // Cephes expf for float (scalar_math.h), std::exp for double

using atrc_resize::Axis;
using atrc_resize::AxisAdjoint;

// Width interpolation of low-resolution row k of image xb (C x h x w) into u (C x W)
template <typename T>
void width_row(const T* xb, const Axis<T>& aw, int64_t k, int64_t h, int64_t w, int64_t C, int64_t W, T* u) {
  const int32_t* j0 = aw.i0.data();
  const int32_t* j1 = aw.i1.data();
  const T* b0 = aw.l0.data();
  const T* b1 = aw.l1.data();
  for (int64_t c = 0; c < C; ++c) {
    const T* t = xb + (c * h + k) * w;
    T* uc = u + c * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) uc[j] = b0[j] * t[j0[j]] + b1[j] * t[j1[j]];
  }
}

// The width-interpolated rows [klo, khi] of image xb into u ((khi - klo + 1) x C x W)
template <typename T>
void width_rows(const T* xb, const Axis<T>& aw, int64_t klo, int64_t khi, int64_t h, int64_t w, int64_t C,
                int64_t W, T* u) {
  for (int64_t k = klo; k <= khi; ++k) width_row(xb, aw, k, h, w, C, W, u + (k - klo) * C * W);
}

// output row i (C x W) = a0 * u[i0] + a1 * u[i1]; u holds the rows from klo on
template <typename T>
void height_row(const T* u, const Axis<T>& ah, int64_t i, int64_t klo, int64_t C, int64_t W, T* z) {
  const T a0 = ah.l0[i], a1 = ah.l1[i];
  const T* u0 = u + (ah.i0[i] - klo) * C * W;
  const T* u1 = u + (ah.i1[i] - klo) * C * W;
#pragma omp simd
  for (int64_t e = 0; e < C * W; ++e) z[e] = a0 * u0[e] + a1 * u1[e];
}

// lse[j] = log sum_c exp(z[c][j]) for the W pixels of a row (m, s: W scratch)
template <typename T>
void row_log_sum_exp(const T* z, int64_t C, int64_t W, T* m, T* s, T* lse) {
  std::copy(z, z + W, m);
  for (int64_t c = 1; c < C; ++c) {
    const T* zc = z + c * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) m[j] = zc[j] > m[j] ? zc[j] : m[j];
  }
  std::fill(s, s + W, static_cast<T>(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* zc = z + c * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) s[j] += fast_exp(zc[j] - m[j]);
  }
  for (int64_t j = 0; j < W; ++j) lse[j] = m[j] + std::log(s[j]);
}

// rows per parallel task: enough tasks for the threads, few rows recomputed at chunk borders
int64_t chunk_rows(int64_t rows_per_image, int64_t B, int64_t most) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (B * rows_per_image) / (4 * threads);
  return std::max<int64_t>(1, std::min<int64_t>(most, want));
}

// The weight of a pixel in the sum: the given per-pixel weight wt[idx], or (wt null) 0 for the
// ignore index, else the class weight cw[t] (1 without class weights).
template <typename T>
struct PixelWeight {
  const T* wt;
  const T* cw;
  int64_t ignore;
  bool ignored(int64_t t) const { return wt == nullptr && t == ignore; }
  T operator()(int64_t idx, int64_t t) const {
    if (wt != nullptr) return wt[idx];
    if (t == ignore) return static_cast<T>(0);
    return cw != nullptr ? cw[t] : static_cast<T>(1);
  }
};

template <typename T>
void forward_impl(const T* x, const int64_t* y, const PixelWeight<T>& pw, T* lse, double* row_sums,
                  double* row_dens, std::atomic<int64_t>* bad, int64_t B, int64_t h, int64_t w, int64_t C,
                  int64_t H, int64_t W) {
  const Axis<T> ah(h, H), aw(w, W);
  const int64_t rows = chunk_rows(H, B, 16);
  const int64_t chunks = (H + rows - 1) / rows;
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> u, z(C * W), m(W), s(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks, o0 = (task % chunks) * rows, o1 = std::min(H, o0 + rows);
      const int64_t klo = ah.i0[o0], khi = ah.i1[o1 - 1];
      u.resize((khi - klo + 1) * C * W);
      width_rows(x + b * C * h * w, aw, klo, khi, h, w, C, W, u.data());
      for (int64_t i = o0; i < o1; ++i) {
        const int64_t r = b * H + i;
        height_row(u.data(), ah, i, klo, C, W, z.data());
        T* lr = lse + r * W;
        row_log_sum_exp(z.data(), C, W, m.data(), s.data(), lr);
        double acc = 0, den = 0;
        const int64_t* yr = y + r * W;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t t = yr[j];
          if (pw.ignored(t)) continue;
          if (t < 0 || t >= C) {
            bad->store(t);  // reported after the loop
            continue;
          }
          const T wgt = pw(r * W + j, t);
          if (wgt != 0) acc += static_cast<double>(wgt) * static_cast<double>(lr[j] - z[t * W + j]);
          den += static_cast<double>(wgt);
        }
        row_sums[r] = acc;
        row_dens[r] = den;
      }
    }
  });
}

template <typename T>
void backward_impl(const T* x, const int64_t* y, const PixelWeight<T>& pw, const T* lse, T g, T* dx, int64_t B,
                   int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  const Axis<T> ah(h, H), aw(w, W);
  const AxisAdjoint<T> adj(aw, w);
  // every task owns low-resolution rows [k0, k1) of one image: it recomputes the gradient of the
  // output rows that read them (a row read across a border is computed by both tasks, the same
  // way) and adds it in row order: no atomics, the result independent of the threads
  const int64_t rows = chunk_rows(h, B, 8);
  const int64_t chunks = (h + rows - 1) / rows;
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> u, du, sw(W);
    std::vector<int32_t> yc(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks, k0 = (task % chunks) * rows, k1 = std::min(h, k0 + rows);
      int64_t ifirst = 0, ilast = H - 1;
      while (ifirst < H && ah.i1[ifirst] < k0) ++ifirst;
      while (ilast >= 0 && ah.i0[ilast] >= k1) --ilast;
      du.assign((k1 - k0) * C * W, static_cast<T>(0));
      if (ifirst <= ilast) {
        const int64_t klo = ah.i0[ifirst], khi = ah.i1[ilast];
        u.resize((khi - klo + 1) * C * W);
        bool computed = false;
        for (int64_t i = ifirst; i <= ilast; ++i) {
          const int64_t r = b * H + i;
          const int64_t* yr = y + r * W;
          bool any = false;
          for (int64_t j = 0; j < W; ++j) {
            sw[j] = g * pw(r * W + j, yr[j]);
            any = any || sw[j] != 0;
          }
          if (!any) continue;
          if (!computed) {
            width_rows(x + b * C * h * w, aw, klo, khi, h, w, C, W, u.data());
            computed = true;
          }
          // per class row: the interpolated logits, dz = sw * (softmax - onehot), added into the
          // (owned) low-resolution rows i0 and i1 with their weights: one pass, in cache
          const T* lr = lse + r * W;
          for (int64_t j = 0; j < W; ++j) yc[j] = static_cast<int32_t>(yr[j]);
          const T a0 = ah.l0[i], a1 = ah.l1[i];
          const T* u0 = u.data() + (ah.i0[i] - klo) * C * W;
          const T* u1 = u.data() + (ah.i1[i] - klo) * C * W;
          const bool own0 = ah.i0[i] >= k0 && ah.i0[i] < k1;
          const bool own1 = ah.i1[i] >= k0 && ah.i1[i] < k1 && ah.i1[i] != ah.i0[i];
          // the owned rows this output row adds into (i0 == i1 at the border: once, both weights)
          T* d0 = du.data() + ((own0 ? ah.i0[i] : ah.i1[i]) - k0) * C * W;
          T* d1 = own0 && own1 ? du.data() + (ah.i1[i] - k0) * C * W : nullptr;
          const T b0 = own0 ? (ah.i1[i] == ah.i0[i] ? a0 + a1 : a0) : a1, b1 = a1;
          for (int64_t c = 0; c < C; ++c) {
            const T* u0c = u0 + c * W;
            const T* u1c = u1 + c * W;
            T* d0c = d0 + c * W;
            const int32_t cc = static_cast<int32_t>(c);
            if (d1 != nullptr) {
              T* d1c = d1 + c * W;
#pragma omp simd
              for (int64_t j = 0; j < W; ++j) {
                const T zj = a0 * u0c[j] + a1 * u1c[j];
                const T dz = sw[j] * fast_exp(zj - lr[j]) - (yc[j] == cc ? sw[j] : static_cast<T>(0));
                d0c[j] += b0 * dz;
                d1c[j] += b1 * dz;
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < W; ++j) {
                const T zj = a0 * u0c[j] + a1 * u1c[j];
                const T dz = sw[j] * fast_exp(zj - lr[j]) - (yc[j] == cc ? sw[j] : static_cast<T>(0));
                d0c[j] += b0 * dz;
              }
            }
          }
        }
      }
      // the width adjoint of every owned row: dx[b, c, k, :] = A_w^T du[k][c]
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t c = 0; c < C; ++c) {
          const T* dz = du.data() + ((k - k0) * C + c) * W;
          T* d = dx + ((b * C + c) * h + k) * w;
          std::fill(d, d + w, static_cast<T>(0));
          for (int64_t q = 0; q < adj.R; ++q) {
            const int32_t* id = adj.idx.data() + q * w;
            const T* lq = adj.lam.data() + q * w;
#pragma omp simd
            for (int64_t e = 0; e < w; ++e) d[e] += lq[e] * dz[id[e]];
          }
        }
      }
    }
  });
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& y, const std::optional<torch::Tensor>& wt,
                  const std::optional<torch::Tensor>& cw) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "upsample_cross_entropy: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "upsample_cross_entropy: logits must be B x C x h x w contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "upsample_cross_entropy: float32 or float64 logits, got ", x.scalar_type());
  TORCH_CHECK(y.dim() == 3 && y.is_contiguous() && y.scalar_type() == at::kLong,
              "upsample_cross_entropy: target must be a contiguous int64 B x H x W map");
  if (wt.has_value())
    TORCH_CHECK(wt->device().is_cpu() && wt->sizes() == y.sizes() && wt->is_contiguous() &&
                    wt->scalar_type() == x.scalar_type(),
                "upsample_cross_entropy: weights must be B x H x W, contiguous, of the logits' dtype");
  if (cw.has_value())
    TORCH_CHECK(cw->device().is_cpu() && cw->dim() == 1 && cw->size(0) == x.size(1) && cw->is_contiguous() &&
                    cw->scalar_type() == x.scalar_type(),
                "upsample_cross_entropy: class weights must be a contiguous C vector of the logits' dtype");
  TORCH_CHECK(y.size(0) == x.size(0), "upsample_cross_entropy: batch sizes differ (", x.size(0), " vs ",
              y.size(0), ")");
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0 && y.size(1) > 0 && y.size(2) > 0,
              "upsample_cross_entropy: empty input");
}

template <typename T>
PixelWeight<T> pixel_weight(const std::optional<torch::Tensor>& wt, const std::optional<torch::Tensor>& cw,
                            int64_t ignore) {
  return {wt.has_value() ? wt->data_ptr<T>() : nullptr, cw.has_value() ? cw->data_ptr<T>() : nullptr, ignore};
}

// -> (total: 0-dim of x's dtype, lse: B x H x W, den: 0-dim, the sum of the pixel weights)
std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor y, std::optional<torch::Tensor> wt,
                                   std::optional<torch::Tensor> cw, int64_t ignore_index) {
  check_inputs(x, y, wt, cw);
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3), H = y.size(1), W = y.size(2);
  auto lse = torch::empty({B, H, W}, x.options());
  std::vector<double> row_sums(static_cast<size_t>(B * H)), row_dens(static_cast<size_t>(B * H));
  std::atomic<int64_t> bad{0};
  std::atomic<int64_t>* flag = &bad;
  const int64_t none = std::numeric_limits<int64_t>::min();
  bad.store(none);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upsample_cross_entropy_forward", [&] {
    const auto pw = pixel_weight<scalar_t>(wt, cw, ignore_index);
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), pw, lse.data_ptr<scalar_t>(),
                           row_sums.data(), row_dens.data(), flag, B, h, w, C, H, W);
  });
  TORCH_CHECK(bad.load() == none, "upsample_cross_entropy: target class ", bad.load(), " is out of range [0, ", C,
              ")");
  double total = 0, den = 0;
  for (double v : row_sums) total += v;
  for (double v : row_dens) den += v;
  return {torch::tensor(total, x.options()).reshape({}), lse, torch::tensor(den, x.options()).reshape({})};
}

// -> d x (B x C x h x w)
torch::Tensor backward(torch::Tensor grad, torch::Tensor x, torch::Tensor y, std::optional<torch::Tensor> wt,
                       std::optional<torch::Tensor> cw, int64_t ignore_index, torch::Tensor lse) {
  check_inputs(x, y, wt, cw);
  TORCH_CHECK(lse.sizes() == y.sizes() && lse.is_contiguous() && lse.scalar_type() == x.scalar_type(),
              "upsample_cross_entropy: lse must be the forward's");
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3), H = y.size(1), W = y.size(2);
  auto dx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upsample_cross_entropy_backward", [&] {
    const scalar_t g = grad.item<scalar_t>();
    const auto pw = pixel_weight<scalar_t>(wt, cw, ignore_index);
    backward_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), pw, lse.data_ptr<scalar_t>(), g,
                            dx.data_ptr<scalar_t>(), B, h, w, C, H, W);
  });
  return dx;
}

// Index of the nearest centroid (max cosine similarity; the first on ties) of every pixel of the
// normal map n (B x 3 x H x W float32, contiguous), with c the K x 3 L2-normalised centroids:
// n is L2-normalised per pixel as atrc_exp.losses.l2_normalize_channels (n / sqrt(max(|n|^2,
// eps^2))), sim_k = c_k . n. Returns (B x H x W int64, whether a similarity was NaN — the caller
// then falls back to PyTorch's argmax, which ranks NaN first).
std::vector<torch::Tensor> nearest_centroid(torch::Tensor n, torch::Tensor c, double eps) {
  TORCH_CHECK(n.device().is_cpu() && n.dim() == 4 && n.size(1) == 3 && n.is_contiguous() &&
                  n.scalar_type() == at::kFloat,
              "nearest_centroid: normals must be a contiguous float32 B x 3 x H x W CPU tensor");
  TORCH_CHECK(c.device().is_cpu() && c.dim() == 2 && c.size(1) == 3 && c.is_contiguous() &&
                  c.scalar_type() == at::kFloat && c.size(0) > 0,
              "nearest_centroid: centroids must be a contiguous float32 K x 3 CPU tensor");
  const int64_t B = n.size(0), S = n.size(2) * n.size(3), K = c.size(0);
  auto idx = torch::empty({B, n.size(2), n.size(3)}, n.options().dtype(at::kLong));
  const float* np = n.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const float eps2 = static_cast<float>(eps * eps);
  std::atomic<bool> nan{false};
  constexpr int64_t kBlock = 256;  // pixels per inner block: the centroid loop vectorises over them
  const int64_t blocks_per_image = (S + kBlock - 1) / kBlock;
  at::parallel_for(0, B * blocks_per_image, 16, [&](int64_t t0, int64_t t1) {
    float nx[kBlock], ny[kBlock], nz[kBlock], best[kBlock];
    int32_t arg[kBlock];
    bool saw_nan = false;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks_per_image, q0 = (t % blocks_per_image) * kBlock;
      const int64_t L = std::min(kBlock, S - q0);
      const float* px = np + (b * 3) * S + q0;
      const float* py = px + S;
      const float* pz = py + S;
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) {
        float ss = px[i] * px[i] + py[i] * py[i] + pz[i] * pz[i];
        ss = ss > eps2 ? ss : eps2;
        const float norm = std::sqrt(ss);
        nx[i] = px[i] / norm;
        ny[i] = py[i] / norm;
        nz[i] = pz[i] / norm;
        best[i] = cp[0] * nx[i] + cp[1] * ny[i] + cp[2] * nz[i];
        arg[i] = 0;
      }
      for (int64_t k = 1; k < K; ++k) {
        const float cx = cp[3 * k], cy = cp[3 * k + 1], cz = cp[3 * k + 2];
        const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) {
          const float v = cx * nx[i] + cy * ny[i] + cz * nz[i];
          const bool better = v > best[i];
          best[i] = better ? v : best[i];
          arg[i] = better ? kk : arg[i];
        }
      }
      int64_t* out = ip + b * S + q0;
      for (int64_t i = 0; i < L; ++i) {
        out[i] = arg[i];
        saw_nan = saw_nan || std::isnan(best[i]);
      }
    }
    if (saw_nan) nan.store(true);
  });
  return {idx, torch::tensor(nan.load())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bilinear upsampling fused into the cross-entropy (CPU, float32/float64)";
  m.def("forward", &forward,
        "(x BxCxhxw, y BxHxW int64, wt BxHxW or None, class weights C or None, ignore index) -> "
        "(sum of w*CE, lse BxHxW, sum of w)");
  m.def("backward", &backward, "(grad, x, y, wt, class weights, ignore index, lse) -> dx BxCxhxw");
  m.def("nearest_centroid", &nearest_centroid, "(normals Bx3xHxW, centroids Kx3, eps) -> (index BxHxW, any NaN)");
}
