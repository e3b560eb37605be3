// Resize-and-add of multi-scale maps for CPU tensors: C++/OpenMP, float32/float64.
//
//   out = [base] + [w0 . x0] + sum_i resize(z_i)
//
// with out B x C x H x W, base (optional) of out's shape, x0 (optional) B x K x H x W and w0 C x K (a
// 1x1 convolution), maps z_i B x C x h_i x w_i (all contiguous, one dtype). The resize is PyTorch's
// bilinear interpolation with align_corners=False to (H, W) (F.interpolate(z, size=(H, W),
// mode="bilinear")):
//   src = max((h / H) * (o + 0.5) - 0.5, 0), i0 = min(floor(src), h - 1), i1 = min(i0 + 1, h - 1),
//   l1 = min(src - i0, 1), l0 = 1 - l1 (the same along the width),
//   r(o, q) = l0h * (l0w * z[i0, j0] + l1w * z[i0, j1]) + l1h * (l0w * z[i1, j0] + l1w * z[i1, j1]).
// A map of the output's size is added as it is (the resize is the identity there).
//
// Why: a 1x1 convolution of concatenated multi-scale features, W . cat(x_0, up(x_1), ...), equals
// W_0 . x_0 + sum_i up(W_i . x_i) (the resize mixes pixels, the convolution channels: they
// commute), with the products at the branches' own resolutions (HRNet18's aux heads: 8x fewer
// multiply-adds). What is left is the full-resolution product with the first branch (few input
// channels: bound by writing the wide output) and the resize-and-add of wide maps, which PyTorch
// does in several passes (and slowly backward, a scatter per map). Here each output row is formed
// once in L1 — the product with x0 (its row loads shared by 8 output planes), then every map's two
// weighted rows (the maps interpolated along the width first, per plane) — and stored once.
//
// Backward (g = dL/d out; d base = g and d x0 = w0^T g need no kernel): per group of 8 planes, one
// pass over g's rows for each map's height adjoint (row i0 += l0h * g row, row i1 += l1h * g row, in
// row order), each map's width adjoint as a gather per low-resolution column, and with x0 the dot
// products of the planes (now in cache) with x0's rows for dw0 (12 register accumulators; per image
// partials in double, summed over the images in order). Work items are independent: no atomics,
// same bits for any number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "bilinear_axis.h"
#include "cpu_vector.h"

namespace {

using atrc_vec::hsum;
using atrc_vec::Vec;
using atrc_vec::VT;
using atrc_vec::vload;
using atrc_vec::vstore;
using atrc_vec::with_const;

// acc[j][0..W) += sum_k w[j*K + k] * x[k*HW + 0..W) for NC rows acc (stride W): the x loads shared by
// the NC output rows, the NC accumulators in registers.
template <typename T, int NC>
inline void conv_rows(T* acc, int64_t W, const T* x, int64_t HW, const T* w, int64_t K) {
  constexpr int L = VT<T>::N;
  int64_t q = 0;
  for (; q + L <= W; q += L) {
    Vec<T> a[NC];
    for (int j = 0; j < NC; ++j) a[j] = vload(acc + j * W + q);
    for (int64_t k = 0; k < K; ++k) {
      const Vec<T> xv = vload(x + k * HW + q);
      for (int j = 0; j < NC; ++j) a[j] += xv * w[j * K + k];
    }
    for (int j = 0; j < NC; ++j) vstore(acc + j * W + q, a[j]);
  }
  for (; q < W; ++q)
    for (int j = 0; j < NC; ++j) {
      T s = acc[j * W + q];
      for (int64_t k = 0; k < K; ++k) s += w[j * K + k] * x[k * HW + q];
      acc[j * W + q] = s;
    }
}

// part[j*K + k] += sum_i g[j*HW + i] * x[k*HW + i] over i < HW, for NC planes of g and NK rows of x
// (12 accumulators at most in registers; lanes summed in a fixed order).
template <typename T, int NC, int NK>
inline void dot_block(const T* g, const T* x, int64_t HW, double* part, int64_t K) {
  constexpr int L = VT<T>::N;
  Vec<T> a[NC][NK];
  for (int j = 0; j < NC; ++j)
    for (int k = 0; k < NK; ++k) a[j][k] = Vec<T>{};
  int64_t i = 0;
  for (; i + L <= HW; i += L) {
    Vec<T> gv[NC];
    for (int j = 0; j < NC; ++j) gv[j] = vload(g + j * HW + i);
    for (int k = 0; k < NK; ++k) {
      const Vec<T> xv = vload(x + k * HW + i);
      for (int j = 0; j < NC; ++j) a[j][k] += gv[j] * xv;
    }
  }
  for (int j = 0; j < NC; ++j)
    for (int k = 0; k < NK; ++k) {
      T s = hsum<T>(a[j][k]);
      for (int64_t t = i; t < HW; ++t) s += g[j * HW + t] * x[k * HW + t];
      part[j * K + k] += s;
    }
}

using atrc_resize::Axis;
using atrc_resize::AxisAdjoint;

template <typename T>
struct Level {
  const T* z;  // forward: the map; backward: unused
  T* dz;       // backward: its gradient
  int64_t h, w;
  bool same;   // the output's size: added / passed through as it is
  Axis<T> ah, aw;
  AxisAdjoint<T> rw;  // the width adjoint (backward)
  Level(int64_t h_, int64_t w_, int64_t H, int64_t W)
      : z(nullptr), dz(nullptr), h(h_), w(w_), same(h_ == H && w_ == W), ah(h_, H), aw(w_, W), rw(aw, w_) {}
};

constexpr int64_t CB = 8;  // output planes (channels of one image) per work item
constexpr int64_t DB = 4;  // planes per dot_block call (DB x 3 accumulators in registers)

// The width-interpolated rows of map lv for plane p: rows (lv.h x W).
template <typename T>
inline void width_rows(const Level<T>& lv, int64_t p, T* rows, int64_t W) {
  const T* z = lv.z + p * lv.h * lv.w;
  const int32_t* j0 = lv.aw.i0.data();
  const int32_t* j1 = lv.aw.i1.data();
  const T* m0 = lv.aw.l0.data();
  const T* m1 = lv.aw.l1.data();
  for (int64_t r = 0; r < lv.h; ++r) {
    const T* zr = z + r * lv.w;
    T* dst = rows + r * W;
    for (int64_t q = 0; q < W; ++q) dst[q] = m0[q] * zr[j0[q]] + m1[q] * zr[j1[q]];
  }
}

// out (B x C x H x W) = [base] + [w0 . x0 (x0 B x K x H x W, w0 C x K)] + sum_i resize(z_i). Work item:
// CB planes (b, c..c+CB-1); every output row is formed in an L1 buffer (the products with x0 share
// its row loads between the CB planes) and stored once.
template <typename T>
void forward_impl(T* out, const T* base, const T* x0, const T* w0, int64_t K, std::vector<Level<T>>& levels, int64_t B,
                  int64_t C, int64_t H, int64_t W) {
  const int64_t nblk = (C + CB - 1) / CB, HW = H * W;
  int64_t rows_per_plane = 0;
  for (auto& lv : levels) rows_per_plane += lv.same ? 0 : lv.h;
  at::parallel_for(0, B * nblk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> rows(CB * rows_per_plane * W), acc(CB * W);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / nblk, c0 = (it % nblk) * CB, nc = std::min(CB, C - c0);
      for (int64_t j = 0; j < nc; ++j) {  // every map along the width, per plane
        T* r = rows.data() + j * rows_per_plane * W;
        for (auto& lv : levels)
          if (!lv.same) {
            width_rows(lv, b * C + c0 + j, r, W);
            r += lv.h * W;
          }
      }
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t j = 0; j < nc; ++j) {
          T* a = acc.data() + j * W;
          if (base) {
            std::copy(base + (b * C + c0 + j) * HW + y * W, base + (b * C + c0 + j) * HW + (y + 1) * W, a);
          } else {
            std::fill(a, a + W, T(0));
          }
        }
        if (x0)
          with_const<CB>(nc, [&](auto n) {
            conv_rows<T, decltype(n)::value>(acc.data(), W, x0 + b * K * HW + y * W, HW, w0 + c0 * K, K);
          });
        for (int64_t j = 0; j < nc; ++j) {
          T* a = acc.data() + j * W;
          const T* r = rows.data() + j * rows_per_plane * W;
          for (auto& lv : levels) {
            if (lv.same) {
              const T* zr = lv.z + (b * C + c0 + j) * HW + y * W;
#pragma omp simd
              for (int64_t q = 0; q < W; ++q) a[q] += zr[q];
              continue;
            }
            const T l0 = lv.ah.l0[y], l1 = lv.ah.l1[y];
            const T* r0 = r + lv.ah.i0[y] * W;
            const T* r1 = r + lv.ah.i1[y] * W;
#pragma omp simd
            for (int64_t q = 0; q < W; ++q) a[q] += l0 * r0[q] + l1 * r1[q];
            r += lv.h * W;
          }
          std::copy(a, a + W, out + (b * C + c0 + j) * HW + y * W);
        }
      }
    }
  });
}

// Gradients for grad g (B x C x H x W): dz_i (the adjoint of each resize, into lv.dz) and, with x0,
// dw0 (C x K) = sum_b sum_pixels g[b, c] x0[b, k]: per image partials (row by row, in row order),
// summed over the images in order after the parallel loop.
template <typename T>
void backward_impl(const T* g, const T* x0, T* dw0, int64_t K, std::vector<Level<T>>& levels, int64_t B, int64_t C,
                   int64_t H, int64_t W) {
  const int64_t nblk = (C + CB - 1) / CB, HW = H * W;
  int64_t rows_per_plane = 0, hmax = 0;
  for (auto& lv : levels)
    if (!lv.same) {
      rows_per_plane += lv.h;
      hmax = std::max(hmax, lv.h);
    }
  std::vector<double> part(x0 ? B * C * K : 0);
  at::parallel_for(0, B * nblk, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> rows(CB * rows_per_plane * W), cols(hmax);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / nblk, c0 = (it % nblk) * CB, nc = std::min(CB, C - c0);
      std::fill(rows.begin(), rows.end(), T(0));
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t j = 0; j < nc; ++j) {  // adjoint along the height, in row order
          const T* gy = g + (b * C + c0 + j) * HW + y * W;
          T* r = rows.data() + j * rows_per_plane * W;
          for (auto& lv : levels) {
            if (lv.same) {
              std::copy(gy, gy + W, lv.dz + (b * C + c0 + j) * HW + y * W);
              continue;
            }
            const T l0 = lv.ah.l0[y], l1 = lv.ah.l1[y];
            T* r0 = r + lv.ah.i0[y] * W;
            T* r1 = r + lv.ah.i1[y] * W;
#pragma omp simd
            for (int64_t q = 0; q < W; ++q) r0[q] += l0 * gy[q];
#pragma omp simd
            for (int64_t q = 0; q < W; ++q) r1[q] += l1 * gy[q];
            r += lv.h * W;
          }
        }
      }
      if (x0)  // dw0 partials of the block's planes: all pixels, 3 rows of x0 at a time
        for (int64_t j0 = 0; j0 < nc; j0 += DB)
          with_const<DB>(std::min(DB, nc - j0), [&](auto n) {
            for (int64_t k = 0; k < K; k += 3)
              with_const<3>(std::min<int64_t>(3, K - k), [&](auto nk) {
                dot_block<T, decltype(n)::value, decltype(nk)::value>(g + (b * C + c0 + j0) * HW,
                                                                      x0 + (b * K + k) * HW, HW,
                                                                      part.data() + (b * C + c0 + j0) * K + k, K);
              });
          });
      for (int64_t j = 0; j < nc; ++j) {  // adjoint along the width: a gather per column, all rows at once
        const T* r = rows.data() + j * rows_per_plane * W;
        for (auto& lv : levels) {
          if (lv.same) continue;
          T* dz = lv.dz + (b * C + c0 + j) * lv.h * lv.w;
          const int32_t* ps = lv.rw.idx.data();
          const T* wt = lv.rw.lam.data();
          for (int64_t c = 0; c < lv.w; ++c) {
            std::fill(cols.begin(), cols.begin() + lv.h, T(0));
            for (int64_t e = 0; e < lv.rw.count[c]; ++e) {
              const T m = wt[e * lv.w + c];
              const T* src = r + ps[e * lv.w + c];
              for (int64_t q = 0; q < lv.h; ++q) cols[q] += m * src[q * W];
            }
            for (int64_t q = 0; q < lv.h; ++q) dz[q * lv.w + c] = cols[q];
          }
          r += lv.h * W;
        }
      }
    }
  });
  if (x0)
    for (int64_t i = 0; i < C * K; ++i) {
      double s = 0;
      for (int64_t b = 0; b < B; ++b) s += part[b * C * K + i];
      dw0[i] = static_cast<T>(s);
    }
}

void check(const torch::Tensor& ref, const torch::Tensor& z, const char* what) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == ref.scalar_type(),
              "upsample_add (cpp): ", what, " must be a CPU tensor of the output's dtype");
  TORCH_CHECK(z.dim() == 4 && z.size(0) == ref.size(0) && z.size(1) == ref.size(1) && z.is_contiguous(),
              "upsample_add (cpp): ", what, " must be contiguous B x C x h x w with the output's B and C, got ",
              z.sizes(), " for ", ref.sizes());
  TORCH_CHECK(z.size(2) > 0 && z.size(3) > 0, "upsample_add (cpp): empty map");
}

void check_out(const torch::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 4 && out.is_contiguous(),
              "upsample_add (cpp): the output must be a contiguous B x C x H x W CPU tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "upsample_add (cpp): float32/float64 only, got ", out.scalar_type());
}

// x0 B x K x H x W and w0 C x K (or C x K x 1 x 1), contiguous, the output's dtype.
void check_conv(const torch::Tensor& out, const torch::Tensor& x0, const torch::Tensor& w0) {
  TORCH_CHECK(x0.device().is_cpu() && x0.scalar_type() == out.scalar_type() && w0.scalar_type() == out.scalar_type(),
              "upsample_add (cpp): x0 and w0 must be CPU tensors of the output's dtype");
  TORCH_CHECK(x0.dim() == 4 && x0.is_contiguous() && x0.size(0) == out.size(0) && x0.size(2) == out.size(2) &&
                  x0.size(3) == out.size(3),
              "upsample_add (cpp): x0 must be contiguous B x K x H x W with the output's B, H, W, got ", x0.sizes());
  TORCH_CHECK(w0.is_contiguous() && w0.numel() == out.size(1) * x0.size(1) && w0.size(0) == out.size(1),
              "upsample_add (cpp): w0 must be contiguous C x K (x 1 x 1), got ", w0.sizes());
}

// out = [base] + [w0 . x0] + sum_i resize(z_i, out's H x W). out may be base (in place); base and
// x0/w0 optional (None).
torch::Tensor ua_forward(torch::Tensor out, c10::optional<torch::Tensor> base, c10::optional<torch::Tensor> x0,
                         c10::optional<torch::Tensor> w0, std::vector<torch::Tensor> zs) {
  check_out(out);
  if (base) check(out, *base, "base");
  TORCH_CHECK(x0.has_value() == w0.has_value(), "upsample_add (cpp): x0 and w0 go together");
  if (x0) check_conv(out, *x0, *w0);
  for (auto& z : zs) check(out, z, "every map");
  const int64_t B = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "upsample_add_forward", [&] {
    std::vector<Level<scalar_t>> levels;
    for (auto& z : zs) {
      levels.emplace_back(z.size(2), z.size(3), H, W);
      levels.back().z = z.data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(out.data_ptr<scalar_t>(), base ? base->data_ptr<scalar_t>() : nullptr,
                           x0 ? x0->data_ptr<scalar_t>() : nullptr, x0 ? w0->data_ptr<scalar_t>() : nullptr,
                           x0 ? x0->size(1) : 0, levels, B, C, H, W);
  });
  return out;
}

// [dw0 (C x K, only with x0), dz_0, dz_1, ...]: the gradients of w0 and of the maps (B x C x sizes[i]).
std::vector<torch::Tensor> ua_backward(torch::Tensor grad, c10::optional<torch::Tensor> x0,
                                       std::vector<std::vector<int64_t>> sizes) {
  check_out(grad);
  const int64_t B = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  std::vector<torch::Tensor> out;
  if (x0) {
    TORCH_CHECK(x0->device().is_cpu() && x0->scalar_type() == grad.scalar_type() && x0->dim() == 4 &&
                    x0->is_contiguous() && x0->size(0) == B && x0->size(2) == H && x0->size(3) == W,
                "upsample_add (cpp): x0 must be contiguous B x K x H x W with grad's B, H, W and dtype");
    out.push_back(torch::empty({C, x0->size(1)}, grad.options()));
  }
  for (auto& s : sizes) {
    TORCH_CHECK(s.size() == 2 && s[0] > 0 && s[1] > 0, "upsample_add (cpp): sizes must be (h, w) pairs");
    out.push_back(torch::empty({B, C, s[0], s[1]}, grad.options()));
  }
  if (grad.numel() == 0) {
    for (auto& t : out) t.zero_();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "upsample_add_backward", [&] {
    std::vector<Level<scalar_t>> levels;
    const size_t off = x0 ? 1 : 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      levels.emplace_back(sizes[i][0], sizes[i][1], H, W);
      levels.back().dz = out[off + i].data_ptr<scalar_t>();
    }
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), x0 ? x0->data_ptr<scalar_t>() : nullptr,
                            x0 ? out[0].data_ptr<scalar_t>() : nullptr, x0 ? x0->size(1) : 0, levels, B, C, H, W);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ua_forward,
        "out = [base] + [w0 . x0] + sum_i bilinear_resize(z_i, out size) (CPU; out may be base); returns out",
        py::arg("out"), py::arg("base"), py::arg("x0"), py::arg("w0"), py::arg("maps"));
  m.def("backward", &ua_backward,
        "gradients (CPU): grad, x0 or None, [(h, w), ...] -> [dw0 (with x0), dz_0, dz_1, ...]", py::arg("grad"),
        py::arg("x0"), py::arg("sizes"));
}
