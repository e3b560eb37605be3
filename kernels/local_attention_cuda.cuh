// ATRC local attention: CUDA kernels (forward + backward), float32/float64/bfloat16/float16 with
// float32 (float64 for double) accumulation. Batched: one launch covers all B images.
// Included by one translation unit per dtype (local_attention_cuda_<dtype>.cu), which instantiates
// atrc_la::forward_impl / backward_impl for that dtype; local_attention_cuda.cpp dispatches.
//
// Semantics: out[b,:,y,x] = sum_o softmax_o(<q[b,:,y,x], k[b,:,y+dy-r,x+dx-r]> / sqrt(C)) v[b,:,...]
// over the k*k window offsets o = (dy, dx); keys/values outside the image are zeros: they score 0
// and stay in the softmax.
//
// Design
//  * forward: one thread per output pixel (x fastest -> coalesced NCHW loads; the key/value
//    windows of neighbouring threads overlap and hit L1/L2). For k in {1,3,5,7,9} the k^2 scores
//    live in registers (fully unrolled loops), channels are the outer loop so q is read once;
//    softmax in registers; the weighted sum loops over channels with the weights in registers.
//    Only out and the per-pixel log-sum-exp (B x H x W, accumulation type) are written.
//  * backward, kernel 1 (per query pixel): recompute the weights exp(s - lse), dA_o = <g, v_o>,
//    dS_o = a_o (dA_o - sum a dA) / sqrt(C), dq = sum_o dS_o k_o; writes a and dS to
//    B x k^2 x H x W buffers (accumulation type).
//    kernel 2 (per key pixel): dk and dv as gathers over the query pixels that see the key pixel
//    (race-free, no atomics), 8 channels per pass.
//  * other odd k: same structure with the per-pixel k^2 arrays in a global scratch buffer.
// Next steps toward the hardware floor (not done yet): shared-memory tiles of q/k/v with halos and
// a channel-blocked register tile per thread.
#pragma once

#include "local_attention_cuda.h"
#include "local_attention_dispatch.h"

#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kCBlock = 8;

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float dlog(float x) { return __logf(x); }
__device__ __forceinline__ double dlog(double x) { return ::log(x); }

// Per-thread array of k^2 values: registers for a compile-time window, else strided global scratch.
template <typename acc_t, int KS>
struct PixelArray {
  acc_t r[KS * KS];
  __device__ __forceinline__ PixelArray(acc_t*, int64_t) {}
  __device__ __forceinline__ acc_t& operator()(int o) { return r[o]; }
};
template <typename acc_t>
struct PixelArray<acc_t, 0> {
  acc_t* p;
  int64_t stride;
  __device__ __forceinline__ PixelArray(acc_t* p_, int64_t s) : p(p_), stride(s) {}
  __device__ __forceinline__ acc_t& operator()(int o) { return p[o * stride]; }
};

// s(o) = <a[:, y, x], b[:, y+dy-r, x+dx-r]> (0 outside the image); a, b: one image, channel stride HW.
template <typename scalar_t, typename acc_t, int KS, typename Arr>
__device__ __forceinline__ void window_scores(Arr& s, const scalar_t* __restrict__ a,
                                              const scalar_t* __restrict__ b, int C, int H, int W, int k,
                                              int y, int x, int64_t HW) {
  const int r = k / 2;
  const int64_t p = int64_t(y) * W + x;
  if constexpr (KS > 0) {
#pragma unroll
    for (int o = 0; o < KS * KS; ++o) s(o) = acc_t(0);
    for (int c = 0; c < C; ++c) {
      const acc_t ac = static_cast<acc_t>(a[c * HW + p]);
      const scalar_t* bc = b + c * HW;
#pragma unroll
      for (int dy = 0; dy < KS; ++dy) {
        const int yy = y + dy - r;
        if (yy < 0 || yy >= H) continue;
#pragma unroll
        for (int dx = 0; dx < KS; ++dx) {
          const int xx = x + dx - r;
          if (xx < 0 || xx >= W) continue;
          s(dy * KS + dx) += ac * static_cast<acc_t>(bc[int64_t(yy) * W + xx]);
        }
      }
    }
  } else {
    for (int dy = 0; dy < k; ++dy) {
      const int yy = y + dy - r;
      for (int dx = 0; dx < k; ++dx) {
        const int xx = x + dx - r;
        acc_t acc = 0;
        if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
          const int64_t pn = int64_t(yy) * W + xx;
          for (int c = 0; c < C; ++c) acc += static_cast<acc_t>(a[c * HW + p]) * static_cast<acc_t>(b[c * HW + pn]);
        }
        s(dy * k + dx) = acc;
      }
    }
  }
}

// out[c, y, x] = sum_o w(o) * b[c, y+dy-r, x+dx-r] for every channel.
template <typename scalar_t, typename acc_t, int KS, typename Arr, typename OutT>
__device__ __forceinline__ void window_wsum(Arr& w, const scalar_t* __restrict__ b, OutT* __restrict__ out, int C,
                                            int H, int W, int k_rt, int y, int x, int64_t HW) {
  const int k = KS > 0 ? KS : k_rt;
  const int r = k / 2;
  const int64_t p = int64_t(y) * W + x;
  for (int c = 0; c < C; ++c) {
    const scalar_t* bc = b + c * HW;
    acc_t acc = 0;
#pragma unroll
    for (int dy = 0; dy < (KS > 0 ? KS : 1); ++dy) {
      // the KS == 0 case loops over all dy below
      for (int dyy = (KS > 0 ? dy : 0); dyy < (KS > 0 ? dy + 1 : k); ++dyy) {
        const int yy = y + dyy - r;
        if (yy < 0 || yy >= H) continue;
#pragma unroll
        for (int dx = 0; dx < (KS > 0 ? KS : 1); ++dx) {
          for (int dxx = (KS > 0 ? dx : 0); dxx < (KS > 0 ? dx + 1 : k); ++dxx) {
            const int xx = x + dxx - r;
            if (xx < 0 || xx >= W) continue;
            acc += w(dyy * k + dxx) * static_cast<acc_t>(bc[int64_t(yy) * W + xx]);
          }
        }
      }
    }
    out[c * HW + p] = static_cast<OutT>(acc);
  }
}

template <typename scalar_t, int KS>
__global__ void __launch_bounds__(kThreads)
    la_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                      const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                      at::acc_type<scalar_t, true>* __restrict__ lse, at::acc_type<scalar_t, true>* scratch, int B,
                      int C, int H, int W, int ks, at::acc_type<scalar_t, true> scale) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t HW = int64_t(H) * W;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * HW) return;
  const int b = static_cast<int>(idx / HW);
  const int64_t p = idx - b * HW;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p - int64_t(y) * W);
  const int k_ = KS > 0 ? KS : ks;
  const int K2 = k_ * k_;
  const int64_t boff = int64_t(b) * C * HW;
  PixelArray<acc_t, KS> s(scratch ? scratch + int64_t(b) * K2 * HW + p : nullptr, HW);
  window_scores<scalar_t, acc_t, KS>(s, q + boff, k + boff, C, H, W, k_, y, x, HW);
  acc_t m = -INFINITY;
#pragma unroll
  for (int o = 0; o < (KS > 0 ? KS * KS : 1); ++o) {
    for (int oo = (KS > 0 ? o : 0); oo < (KS > 0 ? o + 1 : K2); ++oo) {
      s(oo) *= scale;
      m = s(oo) > m ? s(oo) : m;
    }
  }
  acc_t l = 0;
#pragma unroll
  for (int o = 0; o < (KS > 0 ? KS * KS : 1); ++o) {
    for (int oo = (KS > 0 ? o : 0); oo < (KS > 0 ? o + 1 : K2); ++oo) {
      s(oo) = dexp(s(oo) - m);
      l += s(oo);
    }
  }
  const acc_t inv = acc_t(1) / l;
#pragma unroll
  for (int o = 0; o < (KS > 0 ? KS * KS : 1); ++o)
    for (int oo = (KS > 0 ? o : 0); oo < (KS > 0 ? o + 1 : K2); ++oo) s(oo) *= inv;
  lse[idx] = m + dlog(l);
  window_wsum<scalar_t, acc_t, KS>(s, v + boff, out + boff, C, H, W, k_, y, x, HW);
}

// Backward kernel 1: per query pixel. P, DS: B x K2 x H x W (acc_t).
template <typename scalar_t, int KS>
__global__ void __launch_bounds__(kThreads)
    la_backward_query_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ q,
                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                             const at::acc_type<scalar_t, true>* __restrict__ lse,
                             at::acc_type<scalar_t, true>* __restrict__ P, at::acc_type<scalar_t, true>* __restrict__ DS,
                             scalar_t* __restrict__ dq, int B, int C, int H, int W, int ks,
                             at::acc_type<scalar_t, true> scale) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t HW = int64_t(H) * W;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * HW) return;
  const int b = static_cast<int>(idx / HW);
  const int64_t p = idx - b * HW;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p - int64_t(y) * W);
  const int k_ = KS > 0 ? KS : ks;
  const int K2 = k_ * k_, r = k_ / 2;
  const int64_t boff = int64_t(b) * C * HW;
  acc_t* Pp = P + int64_t(b) * K2 * HW + p;
  acc_t* DSp = DS + int64_t(b) * K2 * HW + p;
  // a(o): registers for KS > 0, else the P buffer itself
  PixelArray<acc_t, KS> a(Pp, HW);
  window_scores<scalar_t, acc_t, KS>(a, q + boff, k + boff, C, H, W, k_, y, x, HW);
  const acc_t l = lse[idx];
  const scalar_t* gb = g + boff;
  const scalar_t* vb = v + boff;
  acc_t D = 0;
#pragma unroll
  for (int o = 0; o < (KS > 0 ? KS * KS : 1); ++o) {
    for (int oo = (KS > 0 ? o : 0); oo < (KS > 0 ? o + 1 : K2); ++oo) {
      const acc_t ao = dexp(a(oo) * scale - l);
      a(oo) = ao;
      if constexpr (KS > 0) Pp[oo * HW] = ao;
      const int yy = y + oo / k_ - r, xx = x + oo % k_ - r;
      acc_t da = 0;
      if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
        const int64_t pn = int64_t(yy) * W + xx;
        for (int c = 0; c < C; ++c) da += static_cast<acc_t>(gb[c * HW + p]) * static_cast<acc_t>(vb[c * HW + pn]);
      }
      DSp[oo * HW] = da;
      D += ao * da;
    }
  }
  // dS, kept in registers (KS > 0) or in DS (KS == 0); a(o) is not needed afterwards
#pragma unroll
  for (int o = 0; o < (KS > 0 ? KS * KS : 1); ++o) {
    for (int oo = (KS > 0 ? o : 0); oo < (KS > 0 ? o + 1 : K2); ++oo) {
      const acc_t ds = a(oo) * (DSp[oo * HW] - D) * scale;
      DSp[oo * HW] = ds;
      if constexpr (KS > 0) a(oo) = ds;
    }
  }
  if constexpr (KS > 0) {
    window_wsum<scalar_t, acc_t, KS>(a, k + boff, dq + boff, C, H, W, k_, y, x, HW);
  } else {
    PixelArray<acc_t, 0> dsarr(DSp, HW);
    window_wsum<scalar_t, acc_t, 0>(dsarr, k + boff, dq + boff, C, H, W, k_, y, x, HW);
  }
}

// Backward kernel 2: per key pixel (y, x). It is seen by query pixel (y + r - dy, x + r - dx) at
// window offset (dy, dx): dk[c] = sum DS_o(query) q[c](query), dv[c] = sum P_o(query) g[c](query).
template <typename scalar_t, int KS>
__global__ void __launch_bounds__(kThreads)
    la_backward_key_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ q,
                           const at::acc_type<scalar_t, true>* __restrict__ P,
                           const at::acc_type<scalar_t, true>* __restrict__ DS, scalar_t* __restrict__ dk,
                           scalar_t* __restrict__ dv, int B, int C, int H, int W, int ks) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t HW = int64_t(H) * W;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * HW) return;
  const int b = static_cast<int>(idx / HW);
  const int64_t p = idx - b * HW;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p - int64_t(y) * W);
  const int k_ = KS > 0 ? KS : ks;
  const int K2 = k_ * k_, r = k_ / 2;
  const int64_t boff = int64_t(b) * C * HW;
  const acc_t* Pb = P + int64_t(b) * K2 * HW;
  const acc_t* DSb = DS + int64_t(b) * K2 * HW;
  const scalar_t* qb = q + boff;
  const scalar_t* gb = g + boff;
  for (int c0 = 0; c0 < C; c0 += kCBlock) {
    acc_t ak[kCBlock], av[kCBlock];
#pragma unroll
    for (int j = 0; j < kCBlock; ++j) ak[j] = av[j] = acc_t(0);
    for (int dy = 0; dy < k_; ++dy) {
      const int yq = y + r - dy;
      if (yq < 0 || yq >= H) continue;
      for (int dx = 0; dx < k_; ++dx) {
        const int xq = x + r - dx;
        if (xq < 0 || xq >= W) continue;
        const int64_t pq = int64_t(yq) * W + xq;
        const int64_t o = dy * k_ + dx;
        const acc_t ds = DSb[o * HW + pq];
        const acc_t pa = Pb[o * HW + pq];
#pragma unroll
        for (int j = 0; j < kCBlock; ++j) {
          const int c = c0 + j;
          if (c < C) {
            ak[j] += ds * static_cast<acc_t>(qb[c * HW + pq]);
            av[j] += pa * static_cast<acc_t>(gb[c * HW + pq]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCBlock; ++j) {
      const int c = c0 + j;
      if (c < C) {
        dk[boff + c * HW + p] = static_cast<scalar_t>(ak[j]);
        dv[boff + c * HW + p] = static_cast<scalar_t>(av[j]);
      }
    }
  }
}


inline unsigned int n_blocks(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

}  // namespace

namespace atrc_la {

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  int ks) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int B = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t n = int64_t(B) * H * W;
  if (n == 0 || C == 0) return;
  const bool generic = !LA_SPECIALISED_KS(ks);  // must match LA_DISPATCH_KS's default branch
  at::Tensor scratch;
  if (generic) scratch = at::empty({int64_t(B) * ks * ks * H * W}, lse.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(C));
  acc_t* scr = generic ? scratch.data_ptr<acc_t>() : nullptr;
  LA_DISPATCH_KS(ks, [&] {
    la_forward_kernel<scalar_t, KS><<<n_blocks(n), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), scr, B, C, H, W, ks, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void backward_impl(const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int ks) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int B = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t n = int64_t(B) * H * W;
  if (n == 0 || C == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  auto P = at::empty({B, ks * ks, H, W}, lse.options());
  auto DS = at::empty({B, ks * ks, H, W}, lse.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(C));
  LA_DISPATCH_KS(ks, [&] {
    la_backward_query_kernel<scalar_t, KS><<<n_blocks(n), kThreads, 0, stream>>>(
        gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), P.data_ptr<acc_t>(), DS.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), B, C, H, W, ks,
        scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    la_backward_key_kernel<scalar_t, KS><<<n_blocks(n), kThreads, 0, stream>>>(
        gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), P.data_ptr<acc_t>(), DS.data_ptr<acc_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, C, H, W, ks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace atrc_la
