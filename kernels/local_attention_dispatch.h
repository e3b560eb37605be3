// The window sizes with a compile-time kernel (per-pixel arrays in registers), shared by the CPU
// and CUDA kernels. LA_DISPATCH_KS(k, f) calls the lambda f with `constexpr int KS` = k for those
// and KS = 0 (the runtime-k kernel) otherwise; LA_SPECIALISED_KS(k) tells which. The build-only
// check of the CUDA sources on CPU machines (LA_QUICK_COMPILE_CHECK, tests) keeps k = 9 alone.
#pragma once

#ifdef LA_QUICK_COMPILE_CHECK
#define LA_DISPATCH_KS(k, ...)                              \
  switch (k) {                                              \
    case 9: { constexpr int KS = 9; __VA_ARGS__(); break; } \
    default: { constexpr int KS = 0; __VA_ARGS__(); break; } \
  }
#define LA_SPECIALISED_KS(k) ((k) == 9)
#else
#define LA_DISPATCH_KS(k, ...)                              \
  switch (k) {                                              \
    case 1: { constexpr int KS = 1; __VA_ARGS__(); break; } \
    case 3: { constexpr int KS = 3; __VA_ARGS__(); break; } \
    case 5: { constexpr int KS = 5; __VA_ARGS__(); break; } \
    case 7: { constexpr int KS = 7; __VA_ARGS__(); break; } \
    case 9: { constexpr int KS = 9; __VA_ARGS__(); break; } \
    default: { constexpr int KS = 0; __VA_ARGS__(); break; } \
  }
#define LA_SPECIALISED_KS(k) ((k) == 1 || (k) == 3 || (k) == 5 || (k) == 7 || (k) == 9)
#endif
