// Scalar math for the C++/OpenMP CPU kernels that GCC vectorises inside `omp simd` loops
// (with -fno-math-errno -fno-trapping-math): used by upsample_cross_entropy_cpu.cpp (the
// log-sum-exp and softmax of the cross-entropy) and batch_norm_cpu.cpp (the softplus).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace atrc_math {

// exp(x) for float by Cephes' expf: x clamped to [-87.33, 88] (the result a normal float, no
// denormals), x = n ln2 + r (Cody-Waite), exp(r) by a degree-7 polynomial, 2^n from the exponent
// bits; relative error ~1e-7 (float rounding). float64 uses std::exp.
inline float fast_exp(float x) {
  x = x < -87.33f ? -87.33f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

}  // namespace atrc_math
