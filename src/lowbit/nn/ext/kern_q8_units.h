// Units of the q8 decode GEMV (gemv_q8 in kern_avx2.cpp / kern_avx512.cpp): plain C++, included
// by each kernel file and so compiled with that file's target flags.
//
// A weight row is walked group by group; each group's 32-column blocks are taken in units of
// `widths` blocks, largest first (e.g. {4, 2, 1}: as many 4-block units as fit, then at most one
// pair and one single), so a unit never crosses a group. One unit is one integer dot product
// into L int32 lanes, and one FMA applies the lanes' activation scales, read from dv: a vector
// built here once per call instead of two scalar products and broadcasts per block in the row
// loop. Interleaved units (width wi, 4-bit codes): the row's 16 bytes per block hold columns 0-15
// in the low nibbles and 16-31 in the high ones, so the unit's low nibbles (one AND) are
// columns 0-15 of its wi blocks and the high nibbles (shift, AND) columns 16-31; xp holds the
// activations in that order, so each nibble plane meets its activations with no shuffle. Lane l
// of an interleaved unit carries block l / (L / wi). A natural-order unit's block j fills lanes
// 8j .. 8j + 7 (32 bytes -> 8 int32), the rest are 0.
//
// Built per call by each thread: O(M K) work against the N K / 2 code bytes it then streams.
#pragma once

#include <cstdint>
#include <cstring>

#include "lowbit_kern.h"   // Buf

namespace lowbit {
namespace {   // internal linkage: compiled once per ISA file, never shared between them

struct Q8Units {
  Buf<int64_t> gb;   // group g = blocks [gb[g], gb[g + 1])
  Buf<int8_t> xp;    // (M, K) int8 activations, each unit's columns in its order
  Buf<float> dv;     // (M, units, L) per-lane activation scale
  int64_t units = 0, groups = 0;

  // d == nullptr: no dv (the prefill GEMM scales per chunk, not per lane)
  Q8Units(const int8_t* xq, const float* d, const int32_t* bgrp, int64_t M, int64_t K, int L,
          const int (&widths)[3], int wi) {
    const int64_t nb = K / 32;
    groups = nb ? bgrp[nb - 1] + 1 : 0;
    gb.reset(groups + 1);
    for (int64_t g = 0; g <= groups; ++g) gb[g] = nb;
    for (int64_t b = nb - 1; b >= 0; --b) gb[bgrp[b]] = b;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t b = gb[g], b1 = gb[g + 1]; b < b1;) b += next(b1 - b, widths), ++units;
    xp.reset(M * K);
    if (d) dv.reset(M * units * L);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq + m * K;
      int8_t* o = xp.data() + m * K;
      float* v = d ? dv.data() + m * units * L : nullptr;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t b = gb[g], b1 = gb[g + 1]; b < b1; v = v ? v + L : v) {
          const int w = next(b1 - b, widths);
          if (w == wi) {
            for (int j = 0; j < w; ++j) {
              std::memcpy(o + 32 * b + 16 * j, q + 32 * (b + j), 16);
              std::memcpy(o + 32 * b + 16 * (w + j), q + 32 * (b + j) + 16, 16);
            }
            for (int l = 0; v && l < L; ++l) v[l] = d[m * nb + b + l / (L / w)];
          } else {
            std::memcpy(o + 32 * b, q + 32 * b, 32 * w);
            for (int l = 0; v && l < 8 * w && l < L; ++l) v[l] = d[m * nb + b + l / 8];
          }
          b += w;
        }
    }
  }

  static int next(int64_t left, const int (&widths)[3]) {
    for (int w : widths)
      if (w > 0 && left >= w) return w;
    return 1;
  }
};

}  // namespace
}  // namespace lowbit
