// Decode attention read straight from a quantized KV cache (nn/step.py KVCache "int8" / "fp8"),
// included by every ISA file (kern_*.cpp) inside its own namespace, so each gets the loops
// compiled for its target (the lane arrays below are what the vectoriser widens; no float sum
// is reassociated, so every variant adds in the same order up to FMA contraction).
//
// A cache row is hd one-byte codes (int8, or float8 e4m3 bits) and one fp32 scale; row t of kv
// head g decodes to  s[g, t] * val(code),  val = the int8 value, or lut[code] (256 floats) for e4m3.
// Query head h reads kv head h / (H / G) (grouped-query attention, HF's repeat_kv order).
//
//   kv_scores:  sc[h, t] = scaling * ks[g, t] * sum_d q[h, d] * val(kc[g, t, d])  for t in [t0, t1)
//   kv_mix:     part[r, d] = sum_{t in [t0, t1)} p[h, t] * vs[g, t] * val(vc[g, t, d]),  h = g * rep + r
//               (the caller adds the parts of fixed t ranges in order: the same sums on any thread count)
//
// q (H, hd), sc / p (H, end), part (H / G, hd); codes (G, T, hd), scales (G, T); hd a multiple of
// 16 and at most 256, H / G at most 16.
// No row of either is turned into floats in memory: the float cache never exists.

namespace attn_q8 {

constexpr int kLanes = 16;

template <bool kI8>
inline float val(uint8_t c, const float* lut) {
  if constexpr (kI8) return static_cast<float>(static_cast<int8_t>(c));
  else return lut[c];
}

// HD: head_dim as a compile-time constant (64, 128: loops the compiler unrolls), 0 = hd at run time
template <bool kI8, int HD>
void scores(const float* q, int64_t H, int64_t G, const uint8_t* kc, const float* ks, int64_t T,
            int64_t hd_rt, const float* lut, float scaling, int64_t g, int64_t t0, int64_t t1,
            float* sc, int64_t end) {
  const int64_t hd = HD ? HD : hd_rt, rep = H / G;
  float row[256];                                   // one decoded key row (hd <= 256)
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* c = kc + (g * T + t) * hd;
    for (int64_t d = 0; d < hd; ++d) row[d] = val<kI8>(c[d], lut);
    const float s = scaling * ks[g * T + t];
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t h = g * rep + r;
      const float* qh = q + h * hd;
      float acc[kLanes] = {0.f};
      for (int64_t d0 = 0; d0 < hd; d0 += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += qh[d0 + l] * row[d0 + l];
      // pairwise, in a fixed order (8 + 4 + 2 + 1 lanes): short dependency chains, same sums on every ISA
      for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
      sc[h * end + t] = s * acc[0];
    }
  }
}

template <bool kI8, int HD>
void mix(const float* p, int64_t H, int64_t G, const uint8_t* vc, const float* vs, int64_t T,
         int64_t hd_rt, const float* lut, int64_t g, int64_t t0, int64_t t1, int64_t end, float* part) {
  const int64_t hd = HD ? HD : hd_rt, rep = H / G;
  float acc[16 * 256];                              // rep <= 16 query heads per kv head, hd <= 256
  for (int64_t i = 0; i < rep * hd; ++i) acc[i] = 0.f;
  float row[256];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* c = vc + (g * T + t) * hd;
    for (int64_t d = 0; d < hd; ++d) row[d] = val<kI8>(c[d], lut);
    const float s = vs[g * T + t];
    for (int64_t r = 0; r < rep; ++r) {
      const float wt = p[(g * rep + r) * end + t] * s;
      float* a = acc + r * hd;
      for (int64_t d = 0; d < hd; ++d) a[d] += wt * row[d];
    }
  }
  for (int64_t i = 0; i < rep * hd; ++i) part[i] = acc[i];
}

}  // namespace attn_q8

template <bool kI8>
void scores_hd(const float* q, int64_t H, int64_t G, const uint8_t* kc, const float* ks, int64_t T, int64_t hd,
               const float* lut, float scaling, int64_t g, int64_t t0, int64_t t1, float* sc, int64_t end) {
  if (hd == 64) attn_q8::scores<kI8, 64>(q, H, G, kc, ks, T, hd, lut, scaling, g, t0, t1, sc, end);
  else if (hd == 128) attn_q8::scores<kI8, 128>(q, H, G, kc, ks, T, hd, lut, scaling, g, t0, t1, sc, end);
  else attn_q8::scores<kI8, 0>(q, H, G, kc, ks, T, hd, lut, scaling, g, t0, t1, sc, end);
}

template <bool kI8>
void mix_hd(const float* p, int64_t H, int64_t G, const uint8_t* vc, const float* vs, int64_t T, int64_t hd,
            const float* lut, int64_t g, int64_t t0, int64_t t1, int64_t end, float* part) {
  if (hd == 64) attn_q8::mix<kI8, 64>(p, H, G, vc, vs, T, hd, lut, g, t0, t1, end, part);
  else if (hd == 128) attn_q8::mix<kI8, 128>(p, H, G, vc, vs, T, hd, lut, g, t0, t1, end, part);
  else attn_q8::mix<kI8, 0>(p, H, G, vc, vs, T, hd, lut, g, t0, t1, end, part);
}

void kv_scores(const float* q, int64_t H, int64_t G, const uint8_t* kc, const float* ks, int64_t T,
               int64_t hd, const float* lut, bool i8, float scaling, int64_t g, int64_t t0, int64_t t1,
               float* sc, int64_t end) {
  if (i8) scores_hd<true>(q, H, G, kc, ks, T, hd, lut, scaling, g, t0, t1, sc, end);
  else scores_hd<false>(q, H, G, kc, ks, T, hd, lut, scaling, g, t0, t1, sc, end);
}

void kv_mix(const float* p, int64_t H, int64_t G, const uint8_t* vc, const float* vs, int64_t T,
            int64_t hd, const float* lut, bool i8, int64_t g, int64_t t0, int64_t t1, int64_t end, float* part) {
  if (i8) mix_hd<true>(p, H, G, vc, vs, T, hd, lut, g, t0, t1, end, part);
  else mix_hd<false>(p, H, G, vc, vs, T, hd, lut, g, t0, t1, end, part);
}
