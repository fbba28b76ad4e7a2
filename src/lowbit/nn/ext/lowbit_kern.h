// The ISA-specific half of lowbit's CPU kernels: plain C++ on raw pointers, no torch headers.
//
// Each kern_*.cpp is compiled with its own target flags (-mavx512f ..., -mavx2 -mfma, none) and
// exports one KernTable; lowbit_cpu.cpp (compiled for baseline x86-64 / the host's default ISA)
// holds the torch ops, the threading and picks a table at run time from what the CPU reports
// (__builtin_cpu_supports), so one library runs on any x86-64 and the variant can be forced.
// No torch / STL templates are instantiated in the ISA files: an inline function compiled with
// AVX-512 flags there could otherwise be the copy the linker keeps for the baseline file too.
//
// Layouts (see lowbit_cpu.cpp for the full picture):
//   q4x32  codes row = K/2 bytes; each run of 32 columns is 16 bytes, byte j holds column j in
//          its low nibble and column 16+j in its high nibble.
//   u8     codes row = K bytes.
//   q8     activations (the integer decode path): per row m and block b of 32 columns,
//          x[m, 32b + j] ~= d[m, b] * xq[m, 32b + j], xq int8 in [-127, 127], d = max|x| / 127
//          (ggml's Q8_0 rounding), qsum[m, b] = sum_j xq[m, 32b + j].
//   t2x64  ternary codes (t + 1 in {0, 1, 2}, 2 bits each), row = K/4 bytes, K a multiple of 64;
//          each run of 64 columns is 16 bytes, byte j holds columns j, 16+j, 32+j, 48+j in bits
//          1-0, 3-2, 5-4, 7-6 (so one 16-byte load, shifted by 0/2/4/6 and masked, gives the
//          run's 64 codes in column order).
//   q8t    activations of the ternary path (BitNet b1.58): per token m, x[m, k] ~= xs[m] * xq[m, k],
//          xs[m] = max|x[m]| / 127, xq int8 (the rounding of numerics/activation.quantize_act),
//          qsum[m, g] = sum over group g of xq[m, k].
//   w8     W8A8 (lowbit_cpu.cpp's w8a8_linear): u8 codes (N, K), K padded to a multiple of 64,
//          against per-token (or per-tensor) int8 activations (M, K); the kernels give the raw
//          int32 sums, the zero point and the scales are applied by the caller.
#pragma once
#include <cstdint>

namespace lowbit {

struct KernTable {
  const char* name;
  // y[m, n] for n in [n0, n1): fp32 activations x (M, K), K a multiple of 32.
  void (*gemv_q4)(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
                  const float* lut, const float* scale, const float* zero, int64_t G,
                  float* y, int64_t N, int64_t n0, int64_t n1);
  void (*gemv_u8)(const uint8_t* codes, const float* x, int64_t M, int64_t K, int64_t gs,
                  const float* scale, const float* zero, int64_t G,
                  float* y, int64_t N, int64_t n0, int64_t n1);
  // rows [n0, n1), columns [kbeg, kend) of the float weight into out (n1 - n0, kend - kbeg);
  // kbeg, kend multiples of 32 (the prefill paths)
  void (*dequant_q4)(const uint8_t* codes, int64_t K, int64_t gs, const float* lut,
                     const float* scale, const float* zero, int64_t G, int64_t n0, int64_t n1,
                     int64_t kbeg, int64_t kend, float* out);
  void (*dequant_u8)(const uint8_t* codes, int64_t K, int64_t gs, const float* scale,
                     const float* zero, int64_t G, int64_t n0, int64_t n1, int64_t kbeg,
                     int64_t kend, float* out);
  // x (M, K) -> q8 blocks (xq, d, qsum), see above. d is NaN for a block holding NaN / inf.
  void (*quant_q8)(const float* x, int64_t M, int64_t K, int8_t* xq, float* d, int32_t* qsum);
  // integer dot products on q8 activations. q4: integer codes only (lut = 0..15), so
  // W = scale * (code - zero). bgrp[b] = group of block b; xs[m, g] = sum_{b in g} d * qsum.
  void (*gemv_q4q8)(const uint8_t* codes, const int8_t* xq, const float* d, const float* xs,
                    const int32_t* bgrp, int64_t M, int64_t K, const float* scale,
                    const float* zero, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1);
  void (*gemv_u8q8)(const uint8_t* codes, const int8_t* xq, const float* d, const float* xs,
                    const int32_t* bgrp, int64_t M, int64_t K, const float* scale,
                    const float* zero, int64_t G, float* y, int64_t N, int64_t n0, int64_t n1);
  // int8 GEMM for prefill (kern_gemm_q8.h), q4 integer codes, activations rounded per chunk c
  // (blocks cblk[c] .. cblk[c+1]-1, all in group cgrp[c]): x ~= dc[m, c] * xq;
  // xs[m, g] = sum_{c in g} dc * sum(xq over c). nullptr: this variant has none (tile path).
  void (*gemm_q4q8c)(const uint8_t* codes, const int8_t* xq, const float* dc, const float* xs,
                     const int32_t* cgrp, const int32_t* cblk, int64_t C, int64_t M, int64_t K,
                     const float* scale, const float* zero, int64_t G, float* y, int64_t N,
                     int64_t n0, int64_t n1);
  // fp32 prefill GEMM (kern_gemm_f32.h): y[:, n0:n1] = x (M, K) @ W[n0:n1]^T, x packed by
  // gemm_pack_x (blocks mb0..mb1 of gemm_mr rows; the buffer holds ceil(M / mr) * mr * K floats);
  // n0 and n1 - n0 best multiples of gemm_nr (its panel width). nullptr: this variant has none
  // (tile dequantization + at::mm_out).
  int64_t gemm_mr, gemm_nr;
  void (*gemm_pack_x)(const float* x, int64_t M, int64_t K, int64_t mb0, int64_t mb1, float* xp);
  void (*gemm_f32_q4)(const uint8_t* codes, const float* xp, int64_t M, int64_t K, int64_t gs,
                      const float* lut, const float* scale, const float* zero, int64_t G,
                      float* y, int64_t N, int64_t n0, int64_t n1);
  void (*gemm_f32_u8)(const uint8_t* codes, const float* xp, int64_t M, int64_t K, int64_t gs,
                      const float* scale, const float* zero, int64_t G,
                      float* y, int64_t N, int64_t n0, int64_t n1);
  // ternary on per-token int8 activations: y[m, n] = xs[m] * sum_g scale[n, g] *
  // (sum_{k in g} code[n, k] xq[m, k] - qsum[m, g])   (code - 1 = the ternary value; the
  // integer sums are exact in int32). gs: a multiple of 64; scale (N, G).
  void (*gemv_t2q8)(const uint8_t* codes, const int8_t* xq, const float* xs, const int32_t* qsum,
                    int64_t M, int64_t K, int64_t gs, const float* scale, int64_t G,
                    float* y, int64_t N, int64_t n0, int64_t n1);
  // W8A8: raw int32 sums out[m * N + n] = sum_k codes[n, k] * xq[m, k] for n in [n0, n1):
  // u8 codes (N, K), int8 activations (M, K) in [-128, 127], K a multiple of 64 and <= 65536
  // (so |sum| <= 255 * 128 * 65536 < 2^31: exact). out may be the float output's own buffer.
  void (*dot_u8s8)(const uint8_t* codes, const int8_t* xq, int64_t M, int64_t K, int32_t* out,
                   int64_t N, int64_t n0, int64_t n1);
  // W8A8 input rounding, rows [m0, m1) of x (M, K): s = max|x[m]| / 127 (1 for all zero) when
  // s_in is null, else *s_in; xq[m, k] = clamp(round_half_even(x / s), -128, 127) (an IEEE
  // division, as torch's), 0 for k in [K, Kp); qsum[m] = sum_k xq; sx[m] = s, or NaN when some
  // x / s is NaN (x NaN, or an inf under a dynamic scale).
  void (*quant_w8)(const float* x, int64_t K, int64_t Kp, const float* s_in, int64_t m0, int64_t m1,
                   int8_t* xq, float* sx, int32_t* qsum);
  // decode attention on a quantized KV cache (kern_attn_q8.h): scores of kv head g's query
  // heads for positions [t0, t1), and the probability-weighted value sums over [t0, t1)
  void (*kv_scores)(const float* q, int64_t H, int64_t G, const uint8_t* kc, const float* ks, int64_t T,
                    int64_t hd, const float* lut, bool i8, float scaling, int64_t g, int64_t t0, int64_t t1,
                    float* sc, int64_t end);
  void (*kv_mix)(const float* p, int64_t H, int64_t G, const uint8_t* vc, const float* vs, int64_t T,
                 int64_t hd, const float* lut, bool i8, int64_t g, int64_t t0, int64_t t1, int64_t end,
                 float* part);
  // vector-codebook GEMV by table lookup (kern_vq.h): the (V, Kc) table of x against the
  // codebooks, then per row the scaled sum of its indexed table entries
  void (*vq_table)(const float* x, const float* cbT, int64_t Kc, int64_t d, int64_t vpc, int64_t v0,
                   int64_t v1, float* T);
  void (*vq_gemv)(const float* T, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc, int64_t vpg,
                  const float* scaleT, float* y, int64_t n0, int64_t n1);
  // the same on 16-bit tables (kern_vq.h, AVX-512 VBMI byte permutes): vq_qtable rounds the float
  // table of scale groups [g0, g1) to int16 (one step ts[g] per group) held as two byte planes
  // (Tq: 2 KP bytes per vector, KP = vq_table_width(Kc)), vq_gemv_i16 sums the indexed entries.
  // nullptr: this variant has none; the caller also checks the CPU has avx512vbmi and avx512vnni.
  // vq_gemv_i16s: the same sums on AVX2 byte shuffles (any AVX2 or AVX-512 CPU), for codebooks of
  // at most vq_i16s_max_kc entries (above it the float gathers are cheaper).
  void (*vq_qtable)(const float* T, int64_t V, int64_t Kc, int64_t vpg, int64_t g0, int64_t g1, int8_t* Tq,
                    float* ts);
  void (*vq_gemv_i16)(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc,
                     int64_t vpg, const float* scaleT, float* y, int64_t n0, int64_t n1);
  void (*vq_gemv_i16s)(const int8_t* Tq, const float* ts, const uint8_t* idxB, int64_t V, int64_t N, int64_t Kc,
                      int64_t vpg, const float* scaleT, float* y, int64_t n0, int64_t n1);
  int64_t vq_i16s_max_kc;
};

// A zero-initialised heap array for the ISA files' scratch buffers, with internal linkage (an
// anonymous namespace in a header: each translation unit has its own copy). std::vector there
// would instantiate weak std:: symbols compiled with that file's ISA flags, and the linker keeps
// one copy for every caller: an AVX-512 copy reached from the AVX2 or baseline code would be
// SIGILL on a CPU without AVX-512 (seen as weak std::vector<signed char>::_M_default_append and
// Q8Units::~Q8Units in kern_avx2.o and kern_avx512.o, which only link order kept safe).
namespace {

// Bytes per vector in each byte plane of vq_qtable's 16-bit tables: the table size a permute
// takes (vpermb 64 entries, vpermi2b 128, two vpermi2b 256), the entries past Kc zero.
inline int64_t vq_table_width(int64_t Kc) { return Kc <= 64 ? 64 : (Kc <= 128 ? 128 : 256); }

// The indices of a vector-codebook weight as the kernels read them: blocks of 64 rows, each block's
// V vectors one after another, its 64 rows' bytes contiguous per vector: (ceil(N / 64), V, 64),
// the last block's rows past N zero (nn/vq.py VQLinear.indices_b). A row block walks its indices
// as one contiguous stream, where the transposed (V, N) layout of before made it V strided ones.
constexpr int64_t kVqIdxBlock = 64;
inline const uint8_t* vq_idx(const uint8_t* idxB, int64_t V, int64_t v, int64_t n) {
  return idxB + ((n / kVqIdxBlock) * V + v) * kVqIdxBlock + n % kVqIdxBlock;
}

// The byte-shuffle path's layout of those planes (kern_vq.h vq_gemv_i16s, 64 entries): in each
// 64-byte plane, every 16-byte slice after the first minus the slice before it, bytewise mod 256,
// so that the shuffles' slices add back to the entry (planes [0, n_planes) from p).
inline void vq_diff_slices(int8_t* p, int64_t n_planes) {
  for (int64_t i = 0; i < n_planes; ++i, p += 64)
    for (int k = 3; k >= 1; --k)
      for (int j = 0; j < 16; ++j)
        p[16 * k + j] = static_cast<int8_t>(static_cast<uint8_t>(p[16 * k + j]) - static_cast<uint8_t>(p[16 * (k - 1) + j]));
}

// Software prefetch distance of the decode GEMVs, in bytes of a weight row stream (every ISA file):
// with the hardware prefetcher alone, DRAM-resident rows streamed at a third to a half of the
// bandwidth (BENCHMARKS.md, issue 18).
#ifndef LOWBIT_PF_BYTES
#define LOWBIT_PF_BYTES 2048
#endif

// Prefetch offset for a GEMV walking R rows of row_bytes at once: whole passes of R rows, at
// least LOWBIT_PF_BYTES ahead, so each row prefetches the same columns of a row it will read.
inline int64_t pf_rows_ahead(int64_t row_bytes, int64_t R) {
  return R * row_bytes * ((LOWBIT_PF_BYTES + R * row_bytes - 1) / (R * row_bytes));
}

// W8A8 input rounding of one column, the scalar form of quant_w8's vector ops (tails, the
// portable variant): x / s (IEEE), NaN flagged, clamp to [-128, 127], round half to even by the
// 1.5 * 2^23 trick (|v| < 2^22, the default rounding mode). Internal linkage: each ISA file's own.
inline int32_t w8_round1(float x, float sc, bool* nan) {
  const float dv = x / sc;
  if (dv != dv) {
    *nan = true;
    return 0;
  }
  const float v = dv < -128.f ? -128.f : (dv > 127.f ? 127.f : dv);
  return static_cast<int32_t>((v + 12582912.f) - 12582912.f);
}

template <class T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(int64_t n) { reset(n); }
  ~Buf() { delete[] p_; }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void reset(int64_t n) {   // n zeroed elements, the old ones dropped
    delete[] p_;
    p_ = n > 0 ? new T[n]() : nullptr;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
};
}  // namespace

extern const KernTable kern_portable;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernTable kern_avx2;
extern const KernTable kern_avx512;
extern const KernTable kern_avx512vnni;
#endif

}  // namespace lowbit
