// PyTorch's bilinear resize (align_corners=False) along one axis, and its adjoint as a gather, for
// the C++ CPU kernels that resize inside (upsample_cross_entropy_cpu.cpp, upsample_add_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace atrc_resize {

// Source index pairs and weights of the resize in -> out (F.interpolate(..., mode="bilinear")):
//   src = max((in / out) * (o + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1),
//   l1 = min(src - i0, 1), l0 = 1 - l1.
template <typename T>
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<T> l0, l1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out) {
    const T scale = static_cast<T>(in) / static_cast<T>(out);
    for (int64_t o = 0; o < out; ++o) {
      T src = scale * (static_cast<T>(o) + static_cast<T>(0.5)) - static_cast<T>(0.5);
      if (src < 0) src = 0;
      const int64_t a = std::min(static_cast<int64_t>(src), in - 1);
      const T lam = std::min(std::max(src - static_cast<T>(a), static_cast<T>(0)), static_cast<T>(1));
      i0[o] = static_cast<int32_t>(a);
      i1[o] = static_cast<int32_t>(std::min(a + 1, in - 1));
      l1[o] = lam;
      l0[o] = static_cast<T>(1) - lam;
    }
  }
};

// The adjoint of an Axis as a padded gather table: input index k receives
// sum_{r < count[k]} lam[r][k] * v[idx[r][k]] over the output positions that read it, in output
// order (rows count[k] .. R - 1 are padding: lam 0, idx 0). A gather needs no read-after-write
// through memory, unlike the scatter d[i0[o]] += l0[o] v[o].
template <typename T>
struct AxisAdjoint {
  int64_t R = 0;
  std::vector<int32_t> count;  // in
  std::vector<int32_t> idx;    // R x in
  std::vector<T> lam;          // R x in
  AxisAdjoint(const Axis<T>& a, int64_t in) : count(in, 0) {
    std::vector<std::vector<std::pair<int32_t, T>>> readers(in);
    for (size_t o = 0; o < a.i0.size(); ++o) {
      readers[a.i0[o]].emplace_back(static_cast<int32_t>(o), a.l0[o]);
      readers[a.i1[o]].emplace_back(static_cast<int32_t>(o), a.l1[o]);
    }
    for (const auto& r : readers) R = std::max<int64_t>(R, static_cast<int64_t>(r.size()));
    idx.assign(R * in, 0);
    lam.assign(R * in, static_cast<T>(0));
    for (int64_t k = 0; k < in; ++k) {
      count[k] = static_cast<int32_t>(readers[k].size());
      for (size_t r = 0; r < readers[k].size(); ++r) {
        idx[r * in + k] = readers[k][r].first;
        lam[r * in + k] = readers[k][r].second;
      }
    }
  }
};

}  // namespace atrc_resize
