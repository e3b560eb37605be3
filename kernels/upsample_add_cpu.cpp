// base + sum_i bilinear_resize(z_i) for CPU tensors: C++/OpenMP, float32/float64.
//
// Inputs: base B x C x H x W and maps z_i B x C x h_i x w_i (all contiguous, one dtype). The
// resize is PyTorch's bilinear interpolation with align_corners=False to (H, W)
// (F.interpolate(z, size=(H, W), mode="bilinear")):
//   src = max((h / H) * (o + 0.5) - 0.5, 0), i0 = min(floor(src), h - 1), i1 = min(i0 + 1, h - 1),
//   l1 = min(src - i0, 1), l0 = 1 - l1 (the same along the width),
//   r(o, q) = l0h * (l0w * z[i0, j0] + l1w * z[i0, j1]) + l1h * (l0w * z[i1, j0] + l1w * z[i1, j1]).
// A map of the output's size is added as it is (the resize is the identity there).
//
// Why: a 1x1 convolution of concatenated multi-scale features, W . cat(x_0, up(x_1), ...), equals
// W_0 . x_0 + sum_i up(W_i . x_i) (the resize mixes pixels, the convolution channels: they
// commute), with the products at the branches' own resolutions (HRNet18's aux heads: 8x fewer
// multiply-adds). What is left is this resize-and-add of wide maps, which PyTorch does in several
// passes (and slowly backward, a scatter per level); here every output plane is read and written
// once, forward and backward.
//
// Forward (in place on base), per plane (b, c): each map's rows are first interpolated along the
// width into an h_i x W buffer, then every output row adds l0h * row(i0) + l1h * row(i1) of each
// map, vectorised over the width.
// Backward (g = dL/d out; d base = g needs no kernel): per plane, for each map the output rows are
// reduced into an h_i x W buffer (row i0 += l0h * g row, row i1 += l1h * g row, in row order),
// then along the width into dz_i (the adjoint of the interpolation). Planes are independent: no
// atomics, same bits for any number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

// source index pairs and weights of PyTorch's bilinear align_corners=False resize in_size -> out
template <typename T>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<T> l0, l1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out) {
    const T scale = static_cast<T>(in) / static_cast<T>(out);
    for (int64_t o = 0; o < out; ++o) {
      T src = scale * (static_cast<T>(o) + static_cast<T>(0.5)) - static_cast<T>(0.5);
      if (src < 0) src = 0;
      const int64_t a = std::min(static_cast<int64_t>(src), in - 1);
      const T lam = std::min(std::max(src - static_cast<T>(a), static_cast<T>(0)), static_cast<T>(1));
      i0[o] = a;
      i1[o] = std::min(a + 1, in - 1);
      l1[o] = lam;
      l0[o] = static_cast<T>(1) - lam;
    }
  }
};

// The adjoint of an Axis as a gather: for every input position k, the output positions that read
// it and their weights (CSR: entries start[k] .. start[k + 1] - 1, in output order). Summing a
// gather needs no read-after-write through memory, unlike the scatter d[i0[o]] += l0[o] g[o].
template <typename T>
struct Readers {
  std::vector<int64_t> start, pos;
  std::vector<T> wt;
  explicit Readers(const Axis<T>& a, int64_t in) : start(in + 1, 0) {
    const int64_t out = static_cast<int64_t>(a.i0.size());
    std::vector<std::vector<std::pair<int64_t, T>>> by(in);
    for (int64_t o = 0; o < out; ++o) {
      by[a.i0[o]].emplace_back(o, a.l0[o]);
      by[a.i1[o]].emplace_back(o, a.l1[o]);
    }
    for (int64_t k = 0; k < in; ++k) {
      start[k + 1] = start[k] + static_cast<int64_t>(by[k].size());
      for (auto& e : by[k]) {
        pos.push_back(e.first);
        wt.push_back(e.second);
      }
    }
  }
};

template <typename T>
struct Level {
  const T* z;  // forward: the map; backward: unused
  T* dz;       // backward: its gradient
  int64_t h, w;
  bool same;   // the output's size: added / passed through as it is
  Axis<T> ah, aw;
  Readers<T> rw;  // the width adjoint (backward)
  Level(int64_t h_, int64_t w_, int64_t H, int64_t W)
      : z(nullptr), dz(nullptr), h(h_), w(w_), same(h_ == H && w_ == W), ah(h_, H), aw(w_, W), rw(aw, w_) {}
};

template <typename T>
void forward_impl(T* base, std::vector<Level<T>>& levels, int64_t P, int64_t H, int64_t W) {
  int64_t hmax = 0;
  for (auto& lv : levels) hmax = std::max(hmax, lv.same ? int64_t(0) : lv.h);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> rows(hmax * W);
    for (int64_t p = p0; p < p1; ++p) {
      T* o = base + p * H * W;
      for (auto& lv : levels) {
        const T* z = lv.z + p * lv.h * lv.w;
        if (lv.same) {
#pragma omp simd
          for (int64_t i = 0; i < H * W; ++i) o[i] += z[i];
          continue;
        }
        const int64_t* j0 = lv.aw.i0.data();
        const int64_t* j1 = lv.aw.i1.data();
        const T* m0 = lv.aw.l0.data();
        const T* m1 = lv.aw.l1.data();
        for (int64_t r = 0; r < lv.h; ++r) {  // along the width
          const T* zr = z + r * lv.w;
          T* dst = rows.data() + r * W;
          for (int64_t q = 0; q < W; ++q) dst[q] = m0[q] * zr[j0[q]] + m1[q] * zr[j1[q]];
        }
        for (int64_t y = 0; y < H; ++y) {  // along the height, added to the output row
          const T a = lv.ah.l0[y], b = lv.ah.l1[y];
          const T* r0 = rows.data() + lv.ah.i0[y] * W;
          const T* r1 = rows.data() + lv.ah.i1[y] * W;
          T* oy = o + y * W;
#pragma omp simd
          for (int64_t q = 0; q < W; ++q) oy[q] += a * r0[q] + b * r1[q];
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* g, std::vector<Level<T>>& levels, int64_t P, int64_t H, int64_t W) {
  int64_t hmax = 0;
  for (auto& lv : levels) hmax = std::max(hmax, lv.same ? int64_t(0) : lv.h);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> rows(hmax * W), cols(hmax);
    for (int64_t p = p0; p < p1; ++p) {
      const T* gp = g + p * H * W;
      for (auto& lv : levels) {
        T* dz = lv.dz + p * lv.h * lv.w;
        if (lv.same) {
          std::copy(gp, gp + H * W, dz);
          continue;
        }
        std::fill(rows.begin(), rows.begin() + lv.h * W, T(0));
        for (int64_t y = 0; y < H; ++y) {  // adjoint along the height, in row order
          const T a = lv.ah.l0[y], b = lv.ah.l1[y];
          T* r0 = rows.data() + lv.ah.i0[y] * W;
          T* r1 = rows.data() + lv.ah.i1[y] * W;
          const T* gy = gp + y * W;
#pragma omp simd
          for (int64_t q = 0; q < W; ++q) r0[q] += a * gy[q];
#pragma omp simd
          for (int64_t q = 0; q < W; ++q) r1[q] += b * gy[q];
        }
        const int64_t* st = lv.rw.start.data();
        const int64_t* ps = lv.rw.pos.data();
        const T* wt = lv.rw.wt.data();
        // adjoint along the width: per low-resolution column a gather of the columns that read it,
        // all rows at once (independent sums: no dependency chain through one accumulator)
        T* acc = cols.data();
        for (int64_t c = 0; c < lv.w; ++c) {
          std::fill(acc, acc + lv.h, T(0));
          for (int64_t e = st[c]; e < st[c + 1]; ++e) {
            const T m = wt[e];
            const T* src = rows.data() + ps[e];
            for (int64_t r = 0; r < lv.h; ++r) acc[r] += m * src[r * W];
          }
          for (int64_t r = 0; r < lv.h; ++r) dz[r * lv.w + c] = acc[r];
        }
      }
    }
  });
}

void check(const torch::Tensor& ref, const torch::Tensor& z, const char* what) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == ref.scalar_type(),
              "upsample_add (cpp): ", what, " must be a CPU tensor of the output's dtype");
  TORCH_CHECK(z.dim() == 4 && z.size(0) == ref.size(0) && z.size(1) == ref.size(1) && z.is_contiguous(),
              "upsample_add (cpp): ", what, " must be contiguous B x C x h x w with the output's B and C, got ",
              z.sizes(), " for ", ref.sizes());
  TORCH_CHECK(z.size(2) > 0 && z.size(3) > 0, "upsample_add (cpp): empty map");
}

void check_base(const torch::Tensor& base) {
  TORCH_CHECK(base.device().is_cpu() && base.dim() == 4 && base.is_contiguous(),
              "upsample_add (cpp): the output must be a contiguous B x C x H x W CPU tensor");
  TORCH_CHECK(base.scalar_type() == at::kFloat || base.scalar_type() == at::kDouble,
              "upsample_add (cpp): float32/float64 only, got ", base.scalar_type());
}

// base += sum_i resize(z_i, base's H x W), in place; returns base.
torch::Tensor ua_forward(torch::Tensor base, std::vector<torch::Tensor> zs) {
  check_base(base);
  for (auto& z : zs) check(base, z, "every map");
  const int64_t P = base.size(0) * base.size(1), H = base.size(2), W = base.size(3);
  if (base.numel() == 0 || zs.empty()) return base;
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "upsample_add_forward", [&] {
    std::vector<Level<scalar_t>> levels;
    for (auto& z : zs) {
      levels.emplace_back(z.size(2), z.size(3), H, W);
      levels.back().z = z.data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(base.data_ptr<scalar_t>(), levels, P, H, W);
  });
  return base;
}

// The gradients of the maps: dz_i = resize_i^T(grad), each of shape B x C x sizes[i].
std::vector<torch::Tensor> ua_backward(torch::Tensor grad, std::vector<std::vector<int64_t>> sizes) {
  check_base(grad);
  const int64_t B = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3);
  std::vector<torch::Tensor> out;
  for (auto& s : sizes) {
    TORCH_CHECK(s.size() == 2 && s[0] > 0 && s[1] > 0, "upsample_add (cpp): sizes must be (h, w) pairs");
    out.push_back(torch::empty({B, C, s[0], s[1]}, grad.options()));
  }
  if (grad.numel() == 0 || sizes.empty()) {
    for (auto& t : out) t.zero_();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "upsample_add_backward", [&] {
    std::vector<Level<scalar_t>> levels;
    for (size_t i = 0; i < sizes.size(); ++i) {
      levels.emplace_back(sizes[i][0], sizes[i][1], H, W);
      levels.back().dz = out[i].data_ptr<scalar_t>();
    }
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), levels, B * C, H, W);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &ua_forward, "base += sum_i bilinear_resize(z_i, base size) in place (CPU); returns base",
        py::arg("base"), py::arg("maps"));
  m.def("backward", &ua_backward, "gradients of the maps (CPU): grad, [(h, w), ...] -> [dz_i]", py::arg("grad"),
        py::arg("sizes"));
}
