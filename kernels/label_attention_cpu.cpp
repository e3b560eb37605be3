// ATRC label-context attention: C++/OpenMP CPU kernels (forward + backward, float32/float64).
//
// Per image b, with q d x N (N pixels, NCHW: pixel index contiguous), k d x K (K classes, small),
// v dv x K (dv = d in the blocks; another width when a 1x1 convolution was folded into v) and
// scale = 1/sqrt(d):
//   s[n,k] = scale * sum_c q[c,n] k[c,k],  p[n,:] = softmax_k(s[n,:]) (max-subtracted),
//   out[c,n] = sum_k p[n,k] v[c,k]  (or out += ...: accumulated into a given output).
// Backward (g = dL/dout), p recomputed from q and k (nothing but the inputs is saved):
//   dp[n,k] = sum_c g[c,n] v[c,k],  ds = p (dp - sum_k p dp),
//   dq[c,n] = scale sum_k ds[n,k] k[c,k],  dk[c,k] = scale sum_n ds[n,k] q[c,n],
//   dv[c,k] = sum_n p[n,k] g[c,n].
//
// Why: the PyTorch formulation (bmm, softmax over the last dim, bmm, transposes) makes several
// passes over B x N x K and B x N x d buffers in the pixel-minor layout and copies between the
// layouts; the arithmetic is small (d, K <= ~70). Here the work is done on tiles of TILE = 64
// pixels of one image, read in NCHW layout: the tile's scores/probabilities (K x TILE, pixel index
// innermost) stay in L1, every product is a register-blocked loop vectorised over pixels (256-bit
// GCC vector extensions: 8 floats / 4 doubles per vector; blocks sized for 32 vector registers with
// AVX-512VL, else 16), the softmax is vertical (one pixel per lane; a vectorised exp for float,
// std::exp for double). The forward's work item is a tile; the backward's is a chunk of
// CHUNK_TILES tiles (256 pixels): per tile it recomputes p, forms ds and writes dq, keeping p and ds
// of the whole chunk (K x 256, in L2) for the dk/dv reductions at the end of the chunk.
//
// Reductions over pixels (dk, dv) are deterministic and independent of the thread count: each
// chunk reduces its pixels in registers (lane-wise partial sums over the chunk, the lanes then
// added in a fixed order) into its own partial, and the partials are summed in chunk order after
// the parallel loop.
//
// Full tiles/chunks are read from and written to the tensors in place; the last one of an image
// (N not a multiple of the tile/chunk) goes through zero-padded copies: padded pixels have
// q = g = 0, hence ds = 0 and g p = 0, and contribute nothing to dk and dv. Local buffers have a
// row stride of a multiple of the tile plus one cache line (rows in different L1 sets).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_vector.h"

namespace {

constexpr int TILE = 64;        // pixels per tile (a multiple of 2 vectors for float and double)
constexpr int CHUNK_TILES = 4;  // tiles per backward work item (the unit of the dk/dv reduction)

using atrc_vec::hsum;
using atrc_vec::Vec;
using atrc_vec::VT;
using atrc_vec::vload;
using atrc_vec::vmax;
using atrc_vec::vstore;
using atrc_vec::with_const;

// broadcast (written out: Vec{} + s costs an add, adding zero is not an identity for -0)
template <typename T> inline Vec<T> vset(T s);
template <> inline Vec<float> vset<float>(float s) { return Vec<float>{s, s, s, s, s, s, s, s}; }
template <> inline Vec<double> vset<double>(double s) { return Vec<double>{s, s, s, s}; }

// Keeps v in a register: GCC otherwise folds a vector used by several FMAs into each of them as a
// memory operand, which makes the reduction below load-bound.
template <typename V> inline void in_register(V& v) {
#if defined(__x86_64__) && defined(__AVX512VL__)
  __asm__("" : "+v"(v));
#elif defined(__x86_64__) && defined(__AVX__)
  __asm__("" : "+x"(v));
#else
  (void)v;
#endif
}


// exp of float lanes holding x <= 0 (scores minus their maximum) or NaN: x = n ln2 + r with
// |r| <= ln2/2 (Cody-Waite), exp(r) by a degree-6 polynomial (1 + r + r^2 q(r), q a degree-4
// least-squares fit in Chebyshev nodes), 2^n from the exponent bits. Max. relative error ~1e-7 over
// [-87, 0]; 0 below -87 (exp(-87) ~ 1.6e-38: no denormal probabilities); NaN stays NaN.
inline Vec<float> vexp(Vec<float> x) {
  typedef VT<float>::I I;
  const Vec<float> lo = vset<float>(-87.0f);
#if defined(__AVX__)
  const Vec<float> xc = _mm256_max_ps(lo, x);  // the second operand when either is NaN
#else
  const Vec<float> xc = x < lo ? lo : x;
#endif
  // 1.5 * 2^23 + 127: t's low mantissa bits hold round(x / ln2) + 127, the biased exponent of 2^n
  const Vec<float> magic = vset<float>(12583039.0f);
  const Vec<float> t = xc * 1.44269504088896341f + magic;
  const Vec<float> n = t - magic;
  Vec<float> r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Vec<float> p = vset<float>(1.3933644e-3f);
  p = p * r + 8.363175e-3f;
  p = p * r + 4.1666467e-2f;
  p = p * r + 1.6666576e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = bits << 23;  // (n + 127) << 23: the bits above shift out
  Vec<float> s;
  std::memcpy(&s, &bits, sizeof(s));
  return x < lo ? Vec<float>{} : p * s;
}
inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < VT<double>::N; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Register blocks sized for the vector register file: 32 with AVX-512VL (usable by 256-bit
// operations too), else 16.
#if defined(__AVX512VL__)
constexpr int MM_MB = 6, MM_JB = 4;  // 24 accumulators
constexpr int RED_CB = 6, RED_KB = 4;
#else
constexpr int MM_MB = 6, MM_JB = 2;  // 12 accumulators
constexpr int RED_CB = 4, RED_KB = 3;
#endif
static_assert((TILE / 8) % MM_JB == 0, "a tile must be a whole number of pixel blocks");


// ---------------------------------------------------------------------------------------------
// C[m][j] = sum_r W[m*ldw + r] * A[r*lda + j] for m < M and j < nv vectors (a tile), rows of A and
// C pixel-contiguous. Register block: MB rows of C x MM_JB vectors of pixels.
template <typename T, int MB, bool ACC>
inline void mm_block(const T* A, int64_t lda, const T* W, int64_t ldw, int R, T* C, int64_t ldc, int nv) {
  constexpr int L = VT<T>::N, JB = MM_JB;
  for (int jv = 0; jv < nv; jv += JB) {
    Vec<T> acc[MB][JB];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < JB; ++j) acc[m][j] = ACC ? vload(C + m * ldc + (jv + j) * L) : Vec<T>{};
    const T* a = A + jv * L;
    for (int r = 0; r < R; ++r) {
      Vec<T> x[JB];
      for (int j = 0; j < JB; ++j) x[j] = vload(a + r * lda + j * L);
      for (int m = 0; m < MB; ++m) {
        const Vec<T> w = vset<T>(W[m * ldw + r]);
        for (int j = 0; j < JB; ++j) acc[m][j] += w * x[j];
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < JB; ++j) vstore(C + m * ldc + (jv + j) * L, acc[m][j]);
  }
}

// ACC: C += instead of C = .
template <typename T, bool ACC = false>
void mm(const T* A, int64_t lda, const T* W, int64_t ldw, int R, T* C, int64_t ldc, int M, int nv) {
  int m = 0;
  for (; m + MM_MB <= M; m += MM_MB) mm_block<T, MM_MB, ACC>(A, lda, W + m * ldw, ldw, R, C + m * ldc, ldc, nv);
  with_const<MM_MB - 1>(M - m, [&](auto mb) {
    mm_block<T, decltype(mb)::value, ACC>(A, lda, W + m * ldw, ldw, R, C + m * ldc, ldc, nv);
  });
}

// ---------------------------------------------------------------------------------------------
// In place: S (K rows of row stride ld, pixel index innermost; nv vectors of pixels) -> softmax
// over k for every pixel.
template <typename T>
inline void softmax_tile(T* S, int64_t ld, int K, int nv) {
  constexpr int L = VT<T>::N;
  for (int jv = 0; jv < nv; ++jv) {
    T* s = S + jv * L;
    Vec<T> m = vload(s);
    for (int k = 1; k < K; ++k) m = vmax<T>(vload(s + k * ld), m);
    Vec<T> sum = {};
    for (int k = 0; k < K; ++k) {
      const Vec<T> e = vexp(vload(s + k * ld) - m);
      vstore(s + k * ld, e);
      sum += e;
    }
    const Vec<T> inv = T(1) / sum;
    for (int k = 0; k < K; ++k) vstore(s + k * ld, vload(s + k * ld) * inv);
  }
}

// In place: D (dp) -> ds = p (dp - sum_k p dp), P the probabilities (same layout as S above).
template <typename T>
inline void softmax_grad_tile(const T* P, T* D, int64_t ld, int K, int nv) {
  constexpr int L = VT<T>::N;
  for (int jv = 0; jv < nv; ++jv) {
    const T* p = P + jv * L;
    T* dd = D + jv * L;
    Vec<T> dot = {};
    for (int k = 0; k < K; ++k) dot += vload(p + k * ld) * vload(dd + k * ld);
    for (int k = 0; k < K; ++k) vstore(dd + k * ld, vload(p + k * ld) * (vload(dd + k * ld) - dot));
  }
}

// Local copies: columns [n0, n0 + n) of d rows of row stride N into d rows of row stride ld,
// zero-filled up to w columns; and back.
template <typename T>
inline void load_cols(const T* src, int64_t N, int d, int64_t n0, int n, T* dst, int64_t ld, int w) {
  for (int c = 0; c < d; ++c) {
    std::memcpy(dst + c * ld, src + c * N + n0, sizeof(T) * n);
    std::fill(dst + c * ld + n, dst + c * ld + w, T(0));
  }
}
template <typename T>
inline void store_cols(const T* src, int64_t ld, int d, T* dst, int64_t N, int64_t n0, int n) {
  for (int c = 0; c < d; ++c) std::memcpy(dst + c * N + n0, src + c * ld, sizeof(T) * n);
}

// Row stride of the local buffers for w pixels: w plus one cache line, so that the rows of a
// tile do not all map to the same L1 sets (the strides of NCHW planes are multiples of 4 KiB).
template <typename T> constexpr int64_t padded_ld(int64_t w) { return w + 64 / int64_t(sizeof(T)); }

// Per image: kT_s (K x d) = scale k^T, vT (K x d) = v^T, k_s (d x K) = scale k.
template <typename T>
void prepare(const T* k, const T* v, int64_t B, int d, int dv, int K, T scale, T* kT_s, T* vT, T* k_s) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * d * K;
    for (int c = 0; c < d; ++c)
      for (int j = 0; j < K; ++j) {
        const T kk = k[o + c * K + j] * scale;
        if (kT_s) kT_s[o + j * d + c] = kk;
        if (k_s) k_s[o + c * K + j] = kk;
      }
    if (vT) {
      const int64_t ov = b * dv * K;
      for (int c = 0; c < dv; ++c)
        for (int j = 0; j < K; ++j) vT[ov + j * dv + c] = v[ov + c * K + j];
    }
  }
}

// out (dv rows per image, batch stride osb) = or += (accumulate) the attention of q (batch stride qsb).
template <typename T>
void forward_impl(const T* q, int64_t qsb, const T* k, const T* v, T* out, int64_t osb, bool accumulate, int64_t B,
                  int d, int dv, int64_t N, int K, T scale) {
  constexpr int nv = TILE / VT<T>::N;
  constexpr int64_t ld = padded_ld<T>(TILE);
  const int64_t dK = int64_t(d) * K, dvK = int64_t(dv) * K;
  std::vector<T> kT_s(B * dK);
  prepare<T>(k, v, B, d, dv, K, scale, kT_s.data(), nullptr, nullptr);
  const int64_t ntiles = (N + TILE - 1) / TILE;
  at::parallel_for(0, B * ntiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> S(K * ld), qt, ot;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / ntiles, n0 = (it % ntiles) * TILE;
      const int n = static_cast<int>(std::min<int64_t>(TILE, N - n0));
      // full tiles straight from/to the tensors, the last one through zero-padded copies
      const T* qs = q + b * qsb + n0;
      T* os = out + b * osb + n0;
      int64_t lq = N;
      if (n < TILE) {
        qt.resize(d * ld);
        ot.resize(dv * ld);
        load_cols(q + b * qsb, N, d, n0, n, qt.data(), ld, TILE);
        if (accumulate) load_cols(out + b * osb, N, dv, n0, n, ot.data(), ld, TILE);
        qs = qt.data();
        os = ot.data();
        lq = ld;
      }
      mm<T>(qs, lq, kT_s.data() + b * dK, d, d, S.data(), ld, K, nv);  // scores
      softmax_tile<T>(S.data(), ld, K, nv);
      if (accumulate)
        mm<T, true>(S.data(), ld, v + b * dvK, K, K, os, lq, dv, nv);  // out +=
      else
        mm<T>(S.data(), ld, v + b * dvK, K, K, os, lq, dv, nv);  // out
      if (n < TILE) store_cols(ot.data(), ld, dv, out + b * osb, N, n0, n);
    }
  });
}

// dst[c*K + k] = sum_j A[c][j] * Bm[k][j] over nv vectors of pixels, lanes summed in a fixed order.
template <typename T, int CB, int KB>
inline void red_block(const T* A, int64_t lda, const T* Bm, int64_t ldb, int nv, T* dst, int K) {
  constexpr int L = VT<T>::N;
  Vec<T> s[CB][KB];
  for (int c = 0; c < CB; ++c)
    for (int k = 0; k < KB; ++k) s[c][k] = Vec<T>{};
  for (int jv = 0; jv < nv; ++jv) {
    Vec<T> b[KB];
    for (int k = 0; k < KB; ++k) b[k] = vload(Bm + k * ldb + jv * L);
    for (int c = 0; c < CB; ++c) {
      Vec<T> a = vload(A + c * lda + jv * L);
      in_register(a);
      for (int k = 0; k < KB; ++k) s[c][k] += a * b[k];
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int k = 0; k < KB; ++k) dst[c * K + k] = hsum<T>(s[c][k]);
}

template <typename T, int CB>
inline void red_rows(const T* A, int64_t lda, const T* Bm, int64_t ldb, int nv, T* dst, int K) {
  int k = 0;
  for (; k + RED_KB <= K; k += RED_KB) red_block<T, CB, RED_KB>(A, lda, Bm + k * ldb, ldb, nv, dst + k, K);
  with_const<RED_KB - 1>(K - k, [&](auto kb) {
    red_block<T, CB, decltype(kb)::value>(A, lda, Bm + k * ldb, ldb, nv, dst + k, K);
  });
}

// dst (C x K) = A (C rows of stride lda) . Bm^T (K rows of stride ldb), contracting nv vectors of
// pixels.
template <typename T>
void reduce(const T* A, int64_t lda, const T* Bm, int64_t ldb, int nv, T* dst, int C, int K) {
  int c = 0;
  for (; c + RED_CB <= C; c += RED_CB) red_rows<T, RED_CB>(A + c * lda, lda, Bm, ldb, nv, dst + c * K, K);
  with_const<RED_CB - 1>(C - c, [&](auto cb) {
    red_rows<T, decltype(cb)::value>(A + c * lda, lda, Bm, ldb, nv, dst + c * K, K);
  });
}

// g: dv rows per image, batch stride gsb.
template <typename T>
void backward_impl(const T* g, int64_t gsb, const T* q, int64_t qsb, const T* k, const T* v, T* dq, T* dk, T* dv,
                   int64_t B, int d, int dvc, int64_t N, int K, T scale) {
  constexpr int L = VT<T>::N;
  constexpr int nv = TILE / L;
  constexpr int CH = CHUNK_TILES * TILE;
  constexpr int64_t ld = padded_ld<T>(CH);
  const int64_t dK = int64_t(d) * K, dvK = int64_t(dvc) * K, pw = dK + dvK;
  std::vector<T> kT_s(B * dK), vT(B * dvK), k_s(B * dK);
  prepare<T>(k, v, B, d, dvc, K, scale, kT_s.data(), vT.data(), k_s.data());
  const int64_t nchunks = (N + CH - 1) / CH;
  std::vector<T> part(B * nchunks * pw);  // per chunk: [dk partial (d x K) | dv partial (dv x K)]
  at::parallel_for(0, B * nchunks, 1, [&](int64_t i0, int64_t i1) {
    // the chunk's q, g, dq (d x CH), probabilities p and dp -> ds (K x CH); row stride ld
    std::vector<T> S(K * ld), D(K * ld), qc, gc, dqc;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / nchunks, p0 = (it % nchunks) * CH;
      const int np = static_cast<int>(std::min<int64_t>(CH, N - p0));
      const int ntl = (np + TILE - 1) / TILE;  // tiles with pixels (the rest of the chunk is skipped)
      // full chunks straight from/to the tensors, the last one through zero-padded copies
      const T* qs = q + b * qsb + p0;
      const T* gs = g + b * gsb + p0;
      T* dqs = dq + b * d * N + p0;
      int64_t lq = N;
      if (np < CH) {
        qc.resize(d * ld);
        gc.resize(dvc * ld);
        dqc.resize(d * ld);
        load_cols(q + b * qsb, N, d, p0, np, qc.data(), ld, ntl * TILE);
        load_cols(g + b * gsb, N, dvc, p0, np, gc.data(), ld, ntl * TILE);
        qs = qc.data();
        gs = gc.data();
        dqs = dqc.data();
        lq = ld;
      }
      for (int tl = 0; tl < ntl; ++tl) {
        const int64_t o = tl * TILE;
        T *s = S.data() + o, *dd = D.data() + o;
        mm<T>(qs + o, lq, kT_s.data() + b * dK, d, d, s, ld, K, nv);  // scores
        softmax_tile<T>(s, ld, K, nv);                                // p
        mm<T>(gs + o, lq, vT.data() + b * dvK, dvc, dvc, dd, ld, K, nv);  // dp
        softmax_grad_tile<T>(s, dd, ld, K, nv);                       // ds
        mm<T>(dd, ld, k_s.data() + b * dK, K, K, dqs + o, lq, d, nv);  // dq
      }
      if (np < CH) store_cols(dqc.data(), ld, d, dq + b * d * N, N, p0, np);
      T* pk = part.data() + it * pw;
      reduce<T>(qs, lq, D.data(), ld, ntl * nv, pk, d, K);         // sum_n q ds
      reduce<T>(gs, lq, S.data(), ld, ntl * nv, pk + dK, dvc, K);  // sum_n g p
    }
  });
  // chunk partials, summed in chunk order
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < dK; ++i) {
      T sk = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) sk += part[(b * nchunks + ch) * pw + i];
      dk[b * dK + i] = sk * scale;
    }
    for (int64_t i = 0; i < dvK; ++i) {
      T sv = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) sv += part[(b * nchunks + ch) * pw + dK + i];
      dv[b * dvK + i] = sv;
    }
  }
}

// ---------------------------------------------------------------------------------------------
struct Dims {
  int64_t B = 0, N = 0;
  int d = 0, dv = 0, K = 0;
};

// Whether every x[b] is contiguous (the batch stride may be anything).
bool images_contiguous(const torch::Tensor& x) {
  int64_t expect = 1;
  for (int64_t i = x.dim() - 1; i >= 1; --i) {
    if (x.size(i) != 1 && x.stride(i) != expect) return false;
    expect *= x.size(i);
  }
  return true;
}

int64_t batch_stride(const torch::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.numel(); }

// q B x d x (N...), k B x d x (K...), v B x dv x (K...): trailing dimensions flattened (H x W
// pixels, K x 1 classes); k and v contiguous, q contiguous within each image (any batch stride: a
// channel slice).
Dims check_qkv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() >= 3 && k.dim() >= 3 && v.dim() >= 3,
              "label_attention (cpp): expected q B x d x N (or B x d x H x W), k B x d x K and v B x dv x K (or "
              "... x K x 1), got ranks ",
              q.dim(), ", ", k.dim(), ", ", v.dim());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "label_attention (cpp): CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "label_attention (cpp): float32/float64 only, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "label_attention (cpp): q, k and v must have the same dtype");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "label_attention (cpp): k and v must be contiguous");
  TORCH_CHECK(images_contiguous(q),
              "label_attention (cpp): q must be contiguous within each image (B x d x N, any batch stride)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(0) == q.size(0),
              "label_attention (cpp): shape mismatch: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  Dims g;
  g.B = q.size(0);
  const int64_t d = q.size(1), dv = v.size(1);
  if (g.B * d == 0 || dv == 0) return g;
  const int64_t K = k.numel() / (g.B * d);
  TORCH_CHECK(K > 0, "label_attention (cpp): K must be > 0");
  TORCH_CHECK(v.numel() == g.B * dv * K, "label_attention (cpp): v must be B x dv x K with k's K: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(d < (1 << 20) && dv < (1 << 20) && K < (1 << 20), "label_attention (cpp): d, dv or K too large");
  g.d = static_cast<int>(d);
  g.dv = static_cast<int>(dv);
  g.K = static_cast<int>(K);
  g.N = q.numel() / (g.B * d);
  return g;
}

// q's shape with dim 1 = dv
std::vector<int64_t> out_shape(const torch::Tensor& q, int64_t dv) {
  auto s = q.sizes().vec();
  s[1] = dv;
  return s;
}

// The attention of q over (k, v): a new B x dv x (q's pixels) tensor, or added into `out` (that
// shape, every image contiguous, any batch stride) when given.
torch::Tensor la_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                         c10::optional<torch::Tensor> out_) {
  const Dims g = check_qkv(q, k, v);
  const bool accumulate = out_.has_value();
  torch::Tensor out;
  if (accumulate) {
    out = *out_;
    TORCH_CHECK(out.sizes().vec() == out_shape(q, v.size(1)) && out.scalar_type() == q.scalar_type() &&
                    out.device().is_cpu() && images_contiguous(out),
                "label_attention (cpp): out must be B x dv x (q's pixels), q's dtype, contiguous within each image");
  } else {
    out = torch::empty(out_shape(q, v.size(1)), q.options());
  }
  if (out.numel() == 0 || q.numel() == 0) return accumulate ? out : out.zero_();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "label_attention_forward", [&] {
    forward_impl<scalar_t>(q.data_ptr<scalar_t>(), batch_stride(q), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), batch_stride(out), accumulate, g.B, g.d, g.dv, g.N, g.K,
                           static_cast<scalar_t>(scale));
  });
  return out;
}

std::vector<torch::Tensor> la_backward(torch::Tensor grad, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                       double scale) {
  const Dims g = check_qkv(q, k, v);
  TORCH_CHECK(grad.sizes().vec() == out_shape(q, v.size(1)) && grad.scalar_type() == q.scalar_type() &&
                  images_contiguous(grad),
              "label_attention (cpp): grad must be B x dv x (q's pixels) with q's dtype, contiguous within each "
              "image");
  auto dq = torch::empty(q.sizes(), q.options());
  auto dk = torch::empty_like(k);
  auto dv = torch::empty_like(v);
  if (q.numel() == 0 || v.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "label_attention_backward", [&] {
    backward_impl<scalar_t>(grad.data_ptr<scalar_t>(), batch_stride(grad), q.data_ptr<scalar_t>(), batch_stride(q),
                            k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                            dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), g.B, g.d, g.dv, g.N, g.K,
                            static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &la_forward,
        "label attention forward (CPU): q B x d x N (or B x d x H x W), k B x d x K, v B x dv x K (or ... x K x 1), "
        "scale, out (None, or B x dv x N to add into) -> out",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("out") = py::none());
  m.def("backward", &la_backward,
        "label attention backward (CPU): grad (B x dv x N, any batch stride), q, k, v, scale -> [dq, dk, dv] "
        "(their inputs' shapes)",
        py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"));
}
