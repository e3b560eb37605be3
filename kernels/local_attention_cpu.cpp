// ATRC local attention: C++/OpenMP CPU kernels (forward + backward, float32/float64, batched).
//
// out[b,:,y,x] = sum_o softmax_o(<q[b,:,y,x], k[b,:,y+dy-r,x+dx-r]> / sqrt(C)) * v[b,:,y+dy-r,x+dx-r]
// over the k*k offsets o = (dy, dx); keys/values outside the image are zeros (score 0, kept in the
// softmax).
//
// Design (measured fastest on CPU, see benchmarks/bench_local_attention.py):
//  * key/value (and in backward query/grad) are copied once into zero-padded buffers
//    (B x C x (H+2r) x (W'+2r), W' = max(W, lanes)), so the inner loops have no bounds checks and
//    out-of-image positions naturally score 0.
//  * Work item = (image b, row y, block of VL pixels along x); VL = one 256-bit vector
//    (8 floats / 4 doubles, GCC vector extensions -> AVX2/NEON). For each window row dy the k
//    scores of the block are kept in k vector registers while looping over channels (k+1 loads
//    per k FMAs), softmax is done in registers with a vectorised exp, and the weighted sum runs
//    over 4 channels at a time.
//  * Forward stores only out and the per-pixel log-sum-exp (B x H x W). Backward phase 1
//    recomputes the weights a = exp(s - lse), computes dA = <g, v>, dS = a (dA - sum a dA) / sqrt(C)
//    and dq (a gather), and stores a and dS in padded B x k^2 x Hp x Wp buffers; phase 2 computes
//    dk and dv as gathers over the query pixels that see each key pixel (race-free, no atomics).
//  * OpenMP over (b, y) with torch's thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <mutex>

#include "cpu_vector.h"
#include "local_attention_dispatch.h"

namespace {

using atrc_vec::Vec;
using atrc_vec::VT;
using atrc_vec::vload;
using atrc_vec::vmax;
using atrc_vec::vstore;

template <typename T> inline Vec<T> vset(T s) { return Vec<T>{} + s; }
template <typename T> inline Vec<T> vload_n(const T* p, int n) {
  if (n >= VT<T>::N) return vload(p);
  Vec<T> v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <typename T> inline void vstore_n(T* p, Vec<T> v, int n) {
  if (n >= VT<T>::N) return vstore(p, v);
  for (int i = 0; i < n; ++i) p[i] = v[i];
}

// exp for float lanes: Cephes-style range reduction + degree-6 polynomial (rel. err ~2e-7).
inline Vec<float> vexp(Vec<float> x) {
  typedef VT<float>::I I;
  x = vmax<float>(x, vset<float>(-87.0f));
  x = x < vset<float>(88.0f) ? x : vset<float>(88.0f);
  const Vec<float> magic = vset<float>(12582912.0f);  // 1.5 * 2^23: round to nearest
  Vec<float> t = x * 1.44269504088896341f + magic;
  Vec<float> n = t - magic;
  I ni;
  {
    I ti, mi;
    std::memcpy(&ti, &t, sizeof(ti));
    std::memcpy(&mi, &magic, sizeof(mi));
    ni = ti - mi;
  }
  Vec<float> r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec<float> p = vset<float>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  I bits = (ni + 127) << 23;
  Vec<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < VT<double>::N; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Scores of one window row: out[dx] = sum_c A[c] * B[c*sB + dx], dx < k.
// A: C vectors (the block's query/grad, contiguous), B: padded key/value row at the block start.
template <typename T, int KS>
inline void window_dots(const Vec<T>* A, const T* B, int64_t sB, int C, int k, Vec<T>* out) {
  if constexpr (KS > 0) {
    Vec<T> acc[KS];
    for (int dx = 0; dx < KS; ++dx) acc[dx] = Vec<T>{};
    for (int c = 0; c < C; ++c) {
      const Vec<T> a = A[c];
      const T* b = B + c * sB;
      for (int dx = 0; dx < KS; ++dx) acc[dx] += a * vload(b + dx);
    }
    for (int dx = 0; dx < KS; ++dx) out[dx] = acc[dx];
  } else {
    for (int dx = 0; dx < k; ++dx) out[dx] = Vec<T>{};
    for (int c = 0; c < C; ++c) {
      const Vec<T> a = A[c];
      const T* b = B + c * sB;
      for (int dx = 0; dx < k; ++dx) out[dx] += a * vload(b + dx);
    }
  }
}

// Weighted sum: out[c] = sum_{dy,dx} w[dy*k+dx] * B[c*sB + dy*Wp + dx] for all c (4 channels at a
// time), stored (n valid lanes) to dst + c*sDst.
template <typename T, int KS>
inline void window_wsum(const Vec<T>* w, const T* B, int64_t sB, int64_t Wp, int C, int k_rt, T* dst,
                        int64_t sDst, int n) {
  const int k = KS > 0 ? KS : k_rt;
  int c = 0;
  for (; c + 4 <= C; c += 4) {
    Vec<T> a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const T* b0 = B + c * sB;
    for (int dy = 0; dy < k; ++dy) {
      const T* row = b0 + dy * Wp;
      const Vec<T>* wr = w + dy * k;
      for (int dx = 0; dx < k; ++dx) {
        const Vec<T> ww = wr[dx];
        a0 += ww * vload(row + dx);
        a1 += ww * vload(row + sB + dx);
        a2 += ww * vload(row + 2 * sB + dx);
        a3 += ww * vload(row + 3 * sB + dx);
      }
    }
    vstore_n(dst + c * sDst, a0, n);
    vstore_n(dst + (c + 1) * sDst, a1, n);
    vstore_n(dst + (c + 2) * sDst, a2, n);
    vstore_n(dst + (c + 3) * sDst, a3, n);
  }
  for (; c < C; ++c) {
    Vec<T> a0 = {};
    const T* b0 = B + c * sB;
    for (int dy = 0; dy < k; ++dy) {
      const T* row = b0 + dy * Wp;
      const Vec<T>* wr = w + dy * k;
      for (int dx = 0; dx < k; ++dx) a0 += wr[dx] * vload(row + dx);
    }
    vstore_n(dst + c * sDst, a0, n);
  }
}

// Copy B*C planes of H x W into zero-padded planes of Hp x Wp with the image at (r, r).
template <typename T>
void pad_planes(const T* src, T* dst, int64_t planes, int H, int W, int r, int Hp, int Wp) {
  const int64_t rows = planes * Hp;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t pr = 0; pr < rows; ++pr) {
    const int64_t p = pr / Hp;
    const int yy = static_cast<int>(pr % Hp) - r;
    T* d = dst + pr * Wp;
    if (yy < 0 || yy >= H) {
      std::fill(d, d + Wp, T(0));
      continue;
    }
    std::fill(d, d + r, T(0));
    std::memcpy(d + r, src + (p * H + yy) * W, sizeof(T) * W);
    std::fill(d + r + W, d + Wp, T(0));
  }
}

struct Geom {
  int B, C, H, W, k, r, Hp, Wp, Wv;
  int64_t HW, HpWp;
};

template <typename T>
Geom make_geom(const at::Tensor& q, int k) {
  Geom g;
  g.B = q.size(0);
  g.C = q.size(1);
  g.H = q.size(2);
  g.W = q.size(3);
  g.k = k;
  g.r = k / 2;
  g.Wv = std::max(g.W, VT<T>::N);
  g.Hp = g.H + 2 * g.r;
  g.Wp = g.Wv + 2 * g.r;
  g.HW = int64_t(g.H) * g.W;
  g.HpWp = int64_t(g.Hp) * g.Wp;
  return g;
}

// x-block starts: 0, N, 2N, ... with the last one shifted left to stay inside [0, Wv).
template <typename T> inline int block_start(int i, const Geom& g) {
  return std::min(i * VT<T>::N, g.Wv - VT<T>::N);
}
template <typename T> inline int n_blocks(const Geom& g) { return (g.W + VT<T>::N - 1) / VT<T>::N; }

template <typename T, int KS>
void forward_kernel(const T* q, const T* kp, const T* vp, T* out, T* lse, const Geom& g) {
  constexpr int N = VT<T>::N;
  const int k = KS > 0 ? KS : g.k, k2 = k * k, C = g.C;
  const T scale = T(1) / std::sqrt(T(C));
  const int nb = n_blocks<T>(g);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<Vec<T>> Q(C), S(k2);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < g.B; ++b) {
      for (int y = 0; y < g.H; ++y) {
        const T* qb = q + int64_t(b) * C * g.HW + int64_t(y) * g.W;
        const T* kb = kp + int64_t(b) * C * g.HpWp;
        const T* vb = vp + int64_t(b) * C * g.HpWp;
        for (int i = 0; i < nb; ++i) {
          const int x0 = block_start<T>(i, g);
          const int n = std::min(N, g.W - x0);
          for (int c = 0; c < C; ++c) Q[c] = vload_n(qb + c * g.HW + x0, n);
          for (int dy = 0; dy < k; ++dy)
            window_dots<T, KS>(Q.data(), kb + int64_t(y + dy) * g.Wp + x0, g.HpWp, C, k, S.data() + dy * k);
          Vec<T> m = S[0] * scale;
          for (int o = 0; o < k2; ++o) {
            S[o] *= scale;
            m = vmax<T>(m, S[o]);
          }
          Vec<T> sum = {};
          for (int o = 0; o < k2; ++o) {
            S[o] = vexp(S[o] - m);
            sum += S[o];
          }
          const Vec<T> inv = T(1) / sum;
          for (int o = 0; o < k2; ++o) S[o] *= inv;
          Vec<T> l;
          for (int j = 0; j < N; ++j) l[j] = m[j] + std::log(sum[j]);
          vstore_n(lse + int64_t(b) * g.HW + int64_t(y) * g.W + x0, l, n);
          window_wsum<T, KS>(S.data(), vb + int64_t(y) * g.Wp + x0, g.HpWp, g.Wp, C, k,
                             out + int64_t(b) * C * g.HW + int64_t(y) * g.W + x0, g.HW, n);
        }
      }
    }
  }
}

// Phase 1: weights, dS, dq; writes padded P (= a) and DS (B x k2 x Hp x Wp) at the pixel's padded
// position. Phase 2: dk, dv gathers.
template <typename T, int KS>
void backward_kernel(const T* gout, const T* q, const T* qp, const T* gp, const T* kp, const T* vp,
                     const T* lse, T* P, T* DS, T* dq, T* dk, T* dv, const Geom& g) {
  constexpr int N = VT<T>::N;
  const int k = KS > 0 ? KS : g.k, k2 = k * k, C = g.C, r = g.r;
  const T scale = T(1) / std::sqrt(T(C));
  const int nb = n_blocks<T>(g);
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<Vec<T>> Q(C), G(C), A(k2), D(k2);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < g.B; ++b) {
      for (int y = 0; y < g.H; ++y) {
        const int64_t boff = int64_t(b) * C * g.HW + int64_t(y) * g.W;
        const T* kb = kp + int64_t(b) * C * g.HpWp;
        const T* vb = vp + int64_t(b) * C * g.HpWp;
        T* Pb = P + int64_t(b) * k2 * g.HpWp + int64_t(y + r) * g.Wp + r;
        T* DSb = DS + int64_t(b) * k2 * g.HpWp + int64_t(y + r) * g.Wp + r;
        for (int i = 0; i < nb; ++i) {
          const int x0 = block_start<T>(i, g);
          const int n = std::min(N, g.W - x0);
          for (int c = 0; c < C; ++c) {
            Q[c] = vload_n(q + boff + c * g.HW + x0, n);
            G[c] = vload_n(gout + boff + c * g.HW + x0, n);
          }
          const Vec<T> l = vload_n(lse + int64_t(b) * g.HW + int64_t(y) * g.W + x0, n);
          for (int dy = 0; dy < k; ++dy) {
            const int64_t roff = int64_t(y + dy) * g.Wp + x0;
            window_dots<T, KS>(Q.data(), kb + roff, g.HpWp, C, k, A.data() + dy * k);
            window_dots<T, KS>(G.data(), vb + roff, g.HpWp, C, k, D.data() + dy * k);
          }
          Vec<T> dsum = {};
          for (int o = 0; o < k2; ++o) {
            A[o] = vexp(A[o] * scale - l);
            dsum += A[o] * D[o];
          }
          for (int o = 0; o < k2; ++o) {
            D[o] = A[o] * (D[o] - dsum) * scale;
            vstore_n(Pb + o * g.HpWp + x0, A[o], n);
            vstore_n(DSb + o * g.HpWp + x0, D[o], n);
          }
          window_wsum<T, KS>(D.data(), kb + int64_t(y) * g.Wp + x0, g.HpWp, g.Wp, C, k, dq + boff + x0, g.HW, n);
        }
      }
    }
  }
  // zero the borders of P and DS (only has to be finite: qp/gp are zero there, but keep it clean)
  const int64_t planes = int64_t(g.B) * k2;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t p = 0; p < planes; ++p) {
    for (T* base : {P + p * g.HpWp, DS + p * g.HpWp}) {
      std::fill(base, base + int64_t(r) * g.Wp, T(0));
      std::fill(base + int64_t(r + g.H) * g.Wp, base + g.HpWp, T(0));
      for (int yy = r; yy < r + g.H; ++yy) {
        T* row = base + int64_t(yy) * g.Wp;
        std::fill(row, row + r, T(0));
        std::fill(row + r + g.W, row + g.Wp, T(0));
      }
    }
  }
  // Phase 2: key pixel (y, x) is seen by query pixel (y + r - dy, x + r - dx) at offset (dy, dx);
  // in padded coordinates that pixel sits at (y + 2r - dy, x + 2r - dx).
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (int b = 0; b < g.B; ++b) {
    for (int y = 0; y < g.H; ++y) {
      const T* Pb = P + int64_t(b) * k2 * g.HpWp;
      const T* DSb = DS + int64_t(b) * k2 * g.HpWp;
      const T* qb = qp + int64_t(b) * C * g.HpWp;
      const T* gb = gp + int64_t(b) * C * g.HpWp;
      const int64_t ooff = int64_t(b) * C * g.HW + int64_t(y) * g.W;
      for (int i = 0; i < nb; ++i) {
        const int x0 = block_start<T>(i, g);
        const int n = std::min(N, g.W - x0);
        int c = 0;
        for (; c + 4 <= C; c += 4) {
          Vec<T> k0 = {}, k1 = {}, k2v = {}, k3 = {}, v0 = {}, v1 = {}, v2 = {}, v3 = {};
          for (int dy = 0; dy < k; ++dy) {
            for (int dx = 0; dx < k; ++dx) {
              const int o = dy * k + dx;
              const int64_t off = int64_t(y + 2 * r - dy) * g.Wp + x0 + 2 * r - dx;
              const Vec<T> ds = vload(DSb + o * g.HpWp + off);
              const Vec<T> a = vload(Pb + o * g.HpWp + off);
              const T* qc = qb + c * g.HpWp + off;
              const T* gc = gb + c * g.HpWp + off;
              k0 += ds * vload(qc);
              k1 += ds * vload(qc + g.HpWp);
              k2v += ds * vload(qc + 2 * g.HpWp);
              k3 += ds * vload(qc + 3 * g.HpWp);
              v0 += a * vload(gc);
              v1 += a * vload(gc + g.HpWp);
              v2 += a * vload(gc + 2 * g.HpWp);
              v3 += a * vload(gc + 3 * g.HpWp);
            }
          }
          T* dkc = dk + ooff + c * g.HW + x0;
          T* dvc = dv + ooff + c * g.HW + x0;
          vstore_n(dkc, k0, n);
          vstore_n(dkc + g.HW, k1, n);
          vstore_n(dkc + 2 * g.HW, k2v, n);
          vstore_n(dkc + 3 * g.HW, k3, n);
          vstore_n(dvc, v0, n);
          vstore_n(dvc + g.HW, v1, n);
          vstore_n(dvc + 2 * g.HW, v2, n);
          vstore_n(dvc + 3 * g.HW, v3, n);
        }
        for (; c < C; ++c) {
          Vec<T> k0 = {}, v0 = {};
          for (int o = 0; o < k2; ++o) {
            const int dy = o / k, dx = o % k;
            const int64_t off = int64_t(y + 2 * r - dy) * g.Wp + x0 + 2 * r - dx;
            k0 += vload(DSb + o * g.HpWp + off) * vload(qb + c * g.HpWp + off);
            v0 += vload(Pb + o * g.HpWp + off) * vload(gb + c * g.HpWp + off);
          }
          vstore_n(dk + ooff + c * g.HW + x0, k0, n);
          vstore_n(dv + ooff + c * g.HW + x0, v0, n);
        }
      }
    }
  }
}


void check_inputs(const std::vector<at::Tensor>& ts, int64_t k) {
  TORCH_CHECK(k >= 1 && k % 2 == 1, "local_attention: kernel_size must be a positive odd integer, got ", k);
  const auto& q = ts[0];
  TORCH_CHECK(q.dim() == 4, "local_attention: expected B x C x H x W tensors, got rank ", q.dim());
  TORCH_CHECK(q.size(1) > 0, "local_attention: C must be > 0");
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "local_attention (cpp): tensors must be on the CPU");
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "local_attention: dtype mismatch");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "local_attention (cpp): dtype must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), "local_attention: shape mismatch");
    TORCH_CHECK(t.is_contiguous(), "local_attention (cpp): inputs must be contiguous");
  }
}

// Scratch memory (padded copies, P/DS) is reused across calls: freshly mmap'ed buffers cost a
// page fault per 4 KiB, which measured ~25% of the backward time at ATRC sizes. One cached buffer
// (grown to the largest request, kept until exit); a concurrent call that finds it busy
// allocates its own.
struct Scratch {
  std::unique_lock<std::mutex> lock;
  at::Tensor buf;
  size_t used = 0;
  template <typename T> T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(buf.data_ptr<uint8_t>() + used);
    used += (size_t(n) * sizeof(T) + 63) / 64 * 64;
    return p;
  }
};

std::mutex g_scratch_mutex;
at::Tensor g_scratch;

Scratch get_scratch(size_t nbytes) {
  Scratch s;
  nbytes += 64 * 8;  // alignment slack for up to 8 pieces
  std::unique_lock<std::mutex> lk(g_scratch_mutex, std::try_to_lock);
  if (lk.owns_lock()) {
    if (!g_scratch.defined() || size_t(g_scratch.numel()) < nbytes) {
      g_scratch = at::Tensor();  // free first
      g_scratch = at::empty({int64_t(nbytes)}, at::TensorOptions().dtype(at::kByte));
    }
    s.buf = g_scratch;
    s.lock = std::move(lk);
  } else {
    s.buf = at::empty({int64_t(nbytes)}, at::TensorOptions().dtype(at::kByte));
  }
  return s;
}

template <typename T>
T* padded(Scratch& s, const at::Tensor& t, const Geom& g) {
  T* dst = s.take<T>(int64_t(g.B) * g.C * g.HpWp);
  pad_planes<T>(t.data_ptr<T>(), dst, int64_t(g.B) * g.C, g.H, g.W, g.r, g.Hp, g.Wp);
  return dst;
}

std::vector<at::Tensor> la_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   int64_t kernel_size) {
  check_inputs({q, k, v}, kernel_size);
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(2), q.size(3)}, q.options());
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "la_forward", [&] {
    const Geom g = make_geom<scalar_t>(q, static_cast<int>(kernel_size));
    Scratch s = get_scratch(2 * sizeof(scalar_t) * size_t(g.B) * g.C * g.HpWp);
    scalar_t* kp = padded<scalar_t>(s, k, g);
    scalar_t* vp = padded<scalar_t>(s, v, g);
    LA_DISPATCH_KS(g.k, [&] {
      forward_kernel<scalar_t, KS>(q.data_ptr<scalar_t>(), kp, vp, out.data_ptr<scalar_t>(),
                                   lse.data_ptr<scalar_t>(), g);
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> la_backward(const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& lse, int64_t kernel_size) {
  check_inputs({gout, q, k, v}, kernel_size);
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == q.scalar_type() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(3),
              "local_attention (cpp): bad lse tensor");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "la_backward", [&] {
    const Geom g = make_geom<scalar_t>(q, static_cast<int>(kernel_size));
    const int64_t k2 = int64_t(g.k) * g.k;
    Scratch s = get_scratch(sizeof(scalar_t) * size_t(g.B) * g.HpWp * size_t(4 * g.C + 2 * k2));
    scalar_t* kp = padded<scalar_t>(s, k, g);
    scalar_t* vp = padded<scalar_t>(s, v, g);
    scalar_t* qp = padded<scalar_t>(s, q, g);
    scalar_t* gp = padded<scalar_t>(s, gout, g);
    scalar_t* P = s.take<scalar_t>(int64_t(g.B) * k2 * g.HpWp);
    scalar_t* DS = s.take<scalar_t>(int64_t(g.B) * k2 * g.HpWp);
    LA_DISPATCH_KS(g.k, [&] {
      backward_kernel<scalar_t, KS>(gout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), qp, gp, kp, vp,
                                    lse.data_ptr<scalar_t>(), P, DS, dq.data_ptr<scalar_t>(),
                                    dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), g);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &la_forward, "local attention forward (CPU): returns [out, lse]");
  m.def("backward", &la_backward, "local attention backward (CPU): returns [dq, dk, dv]");
}
