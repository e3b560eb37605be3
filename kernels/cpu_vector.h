// 256-bit GCC vector types for the C++/OpenMP CPU kernels (local_attention_cpu.cpp,
// label_attention_cpu.cpp, upsample_add_cpu.cpp): Vec<T> holds VT<T>::N lanes of float (8) or
// double (4); unaligned loads/stores through memcpy; a NaN-propagating max (a NaN in b is kept:
// a > NaN is false); the sum of the lanes in a fixed order; with_const for register-blocked
// templates. Each kernel defines its own broadcast and exp, whose conventions differ.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace atrc_vec {

template <typename T> struct VT;
template <> struct VT<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr int N = 8;
};
template <> struct VT<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int N = 4;
};

template <typename T> using Vec = typename VT<T>::V;

template <typename T> inline Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void vstore(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
template <typename T> inline Vec<T> vmax(Vec<T> a, Vec<T> b) { return a > b ? a : b; }

// sum of the lanes, in a fixed order (pairwise)
template <typename T> inline T hsum(Vec<T> v) {
  constexpr int L = VT<T>::N;
  T x[L];
  std::memcpy(x, &v, sizeof(v));
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) x[i] += x[i + w];
  return x[0];
}

// f(std::integral_constant<int, n>) for a runtime 1 <= n <= N.
template <int N, typename F>
inline void with_const(int64_t n, F&& f) {
  if constexpr (N > 0) {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_const<N - 1>(n, f);
  }
}

}  // namespace atrc_vec
