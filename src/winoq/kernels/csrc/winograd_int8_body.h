// Body of the fixed-point Winograd kernel, included once per instruction set (see
// winograd_int8.cpp) inside a `#pragma GCC target` region and its own namespace.
// The arithmetic is defined in src/winoq/winograd/fixed_point.py; every float step below
// is one IEEE operation in the order given there (built with -ffp-contract=off).

static inline float rha(float t) {  // round half away from zero, exactly (see fixed_point.rha)
  const float a = std::fabs(t), f = std::floor(a);
  return std::copysign(f + (a - f >= 0.5f ? 1.0f : 0.0f), t);
}

// t / 2^k rounded half away from zero (k >= 1): for t < 0, floor((t + half - 1) / 2^k) is
// -floor((-t + half) / 2^k); branch-free so that it vectorizes
static inline int32_t rshift(int32_t t, int k) { return (t + (1 << (k - 1)) + (t >> 31)) >> k; }

static inline float rq(float t, float lo, float hi) {  // rha, then clamp (in float: no int overflow)
  return std::min(std::max(rha(t), lo), hi);
}

#if WINOQ_VNNI
static inline __m512 rha16(__m512 t) {
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  const __m512 m = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(t)));
  const __m512 f = _mm512_roundscale_ps(m, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(m, f), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 a = _mm512_mask_add_ps(f, up, f, _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a),
                                             _mm512_and_si512(sign, _mm512_castps_si512(t))));
}
static inline __m512i rq16(__m512 t, float lo, float hi) {
  return _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(rha16(t), _mm512_set1_ps(lo)), _mm512_set1_ps(hi)));
}
#endif

// dst[i] = rq(src[i] * mul[i])
static inline void quant_ff(const float* __restrict src, const float* __restrict mul, int32_t* __restrict dst, int cnt,
                            float lo, float hi) {
  int i = 0;
#if WINOQ_VNNI
  for (; i + 16 <= cnt; i += 16)
    _mm512_storeu_si512(dst + i, rq16(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_loadu_ps(mul + i)), lo, hi));
#endif
  for (; i < cnt; ++i) dst[i] = (int32_t)rq(src[i] * mul[i], lo, hi);
}

// dst[i] = min(max(rha(src[i] * mul[i]), lo[i]), hi[i]): input codes with per-channel bounds
// (qmin - zp, qmax - zp: the code minus its zero point)
static inline void quant_ffb(const float* __restrict src, const float* __restrict mul, int32_t* __restrict dst, int cnt,
                             const float* __restrict lo, const float* __restrict hi) {
  int i = 0;
#if WINOQ_VNNI
  for (; i + 16 <= cnt; i += 16) {
    const __m512 t = rha16(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_loadu_ps(mul + i)));
    _mm512_storeu_si512(dst + i, _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(t, _mm512_loadu_ps(lo + i)),
                                                                    _mm512_loadu_ps(hi + i))));
  }
#endif
  for (; i < cnt; ++i) dst[i] = (int32_t)std::min(std::max(rha(src[i] * mul[i]), lo[i]), hi[i]);
}

// dst[i] = rq(float(src[i]) * r) + off as u8 (off: 128, plus V's zero point when it has one)
static inline void quant_iu8(const int32_t* __restrict src, float r, uint8_t* __restrict dst, int cnt, float lo, float hi,
                             int32_t offset) {
  int i = 0;
#if WINOQ_VNNI
  const __m512 rv = _mm512_set1_ps(r);
  const __m512i off = _mm512_set1_epi32(offset);
  for (; i + 16 <= cnt; i += 16) {
    __m512i q = rq16(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(src + i)), rv), lo, hi);
    _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
  }
#endif
  for (; i < cnt; ++i) dst[i] = (uint8_t)((int32_t)rq((float)src[i] * r, lo, hi) + offset);
}

// min and max of int32 (into lo, hi)
static inline void minmax_i(const int32_t* __restrict src, int cnt, int32_t& lo, int32_t& hi) {
  int i = 0;
#if WINOQ_VNNI
  __m512i mn = _mm512_set1_epi32(lo), mx = _mm512_set1_epi32(hi);
  for (; i + 16 <= cnt; i += 16) {
    const __m512i t = _mm512_loadu_si512(src + i);
    mn = _mm512_min_epi32(mn, t);
    mx = _mm512_max_epi32(mx, t);
  }
  lo = _mm512_reduce_min_epi32(mn);
  hi = _mm512_reduce_max_epi32(mx);
#endif
  for (; i < cnt; ++i) { lo = std::min(lo, src[i]); hi = std::max(hi, src[i]); }
}

// max |src[i]| of int32
static inline int32_t amax_i(const int32_t* __restrict src, int cnt, int32_t acc) {
  int i = 0;
#if WINOQ_VNNI
  __m512i m = _mm512_setzero_si512();
  for (; i + 16 <= cnt; i += 16) m = _mm512_max_epi32(m, _mm512_abs_epi32(_mm512_loadu_si512(src + i)));
  acc = std::max(acc, _mm512_reduce_max_epi32(m));
#endif
  for (; i < cnt; ++i) acc = std::max(acc, src[i] < 0 ? -src[i] : src[i]);
  return acc;
}

#if WINOQ_VNNI
// 16 values as float32: int32 converted, or float64 (exact integers) rounded once, as torch converts int64
static inline __m512 to_ps16(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
static inline __m512 to_ps16(const double* p) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_loadu_pd(p))),
                            _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8)), 1);
}
#endif

// dst[i] = float(src[i]) * s[i] (+ bias[i]); src int32, or float64 holding exact integers
template <typename T>
static inline void dequant(const T* __restrict src, const float* __restrict s, const float* __restrict bias,
                           float* __restrict dst, int cnt) {
  int i = 0;
#if WINOQ_VNNI
  for (; i + 16 <= cnt; i += 16) {
    __m512 y = _mm512_mul_ps(to_ps16(src + i), _mm512_loadu_ps(s + i));
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + i));
    _mm512_storeu_ps(dst + i, y);
  }
#endif
  for (; i < cnt; ++i) {
    const float y = (float)src[i] * s[i];
    dst[i] = bias ? y + bias[i] : y;
  }
}

// Lanes of one transform step: 16 int32 channels, or 8 channels in float64 for M codes wider than
// 8 bits (an int16 M times 10-bit coefficients overflows int32; fixed_point.plan checks that every
// sum stays within 2^53, so float64 holds them exactly, as int64 would, with 1-uop multiplies
// instead of vpmullq's 3).
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef double v8d __attribute__((vector_size(64), aligned(8)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
// Loads and stores go through these (the typedefs' unaligned attribute is lost on a template
// argument, so `*(V*)p` inside a template would be an aligned access).
template <typename V> struct Lanes;
template <> struct Lanes<v16i> {
  static inline v16i load(const int32_t* p) { return *(const v16i*)p; }
  static inline void store(int32_t* p, v16i v) { *(v16i*)p = v; }
};
template <> struct Lanes<v8d> {
  static inline v8d load(const int32_t* p) { return __builtin_convertvector(*(const v8i*)p, v8d); }
  static inline void store(double* p, v8d v) { *(v8d*)p = v; }
};

// The two-pass integer transform of one lane vector of channels: for every r, s < no
//   out[r*no + s] = sum_j M[s][j] * rshift(sum_i M[r][i] * in[i*ni + j], k)
// (rows ld apart, M: no x ni; Out: int32, or double (exact integers, k = 0) like the lanes V). The tile stays in
// registers / L1 between the passes. NO, NI: the sizes at compile time (unrolled), or 0 for the
// run-time sizes no_, ni_ (at most 8).
template <typename V, typename Out, int NO, int NI>
static inline void transform_t(const int32_t* in, Out* out, const int32_t* M, int k, int64_t ld, int no_ = 0,
                               int ni_ = 0) {
  const int no = NO ? NO : no_, ni = NI ? NI : ni_;
  V tt[NO ? NO : 8][NI ? NI : 8];
  for (int j = 0; j < ni; ++j) {
    V col[NI ? NI : 8];
    for (int i = 0; i < ni; ++i) col[i] = Lanes<V>::load(in + (int64_t)(i * ni + j) * ld);
    for (int r = 0; r < no; ++r) {
      V acc = {};
      for (int i = 0; i < ni; ++i) {
        const Out b = M[r * ni + i];
        if (b) acc += b * col[i];
      }
      if constexpr (std::is_integral<Out>::value) {
        constexpr int sign = 8 * sizeof(Out) - 1;
        if (k) acc = (acc + ((Out)1 << (k - 1)) + (acc >> sign)) >> k;  // rshift, see above
      }
      tt[r][j] = acc;
    }
  }
  for (int r = 0; r < no; ++r)
    for (int s = 0; s < no; ++s) {
      V acc = {};
      for (int j = 0; j < ni; ++j) {
        const Out b = M[s * ni + j];
        if (b) acc += b * tt[r][j];
      }
      Lanes<V>::store(out + (int64_t)(r * no + s) * ld, acc);
    }
}

// the tile shapes in use (F(2,3), F(4,3), F(6,3) and the same-size F(m,5), F(2,7)) unrolled
#define WQ_TILE_SHAPES(T) T(4, 4) T(6, 6) T(8, 8) T(2, 4) T(4, 6) T(6, 8) T(2, 6) T(4, 8) T(2, 8)

template <typename V, typename Out>
static inline void transform(const int32_t* in, Out* out, const int32_t* M, int no, int ni, int k, int64_t ld) {
#define WQ_T(o, i) if (no == o && ni == i) return transform_t<V, Out, o, i>(in, out, M, k, ld);
  WQ_TILE_SHAPES(WQ_T)
#undef WQ_T
  transform_t<V, Out, 0, 0>(in, out, M, k, ld, no, ni);
}

// 16 channels in int32 / 8 channels in float64 (exact integers; no shift)
static inline void transform16(const int32_t* in, int32_t* out, const int32_t* M, int no, int ni, int k, int64_t ld) {
  transform<v16i, int32_t>(in, out, M, no, ni, k, ld);
}
static inline void transform8d(const int32_t* in, double* out, const int32_t* M, int no, int ni, int64_t ld) {
  transform<v8d, double>(in, out, M, no, ni, 0, ld);
}

// ---------------------------------------------------------------------------- phase A
// One tile: input codes, integer input transform, V codes (u8 = code + 128) and V scales.
// rxc: 4C floats of scratch: this tile's input multipliers, scales and code bounds per channel.
static void input_tile(const Args& a, int64_t p, int32_t* d, int32_t* v, float* rxc, uint8_t* row) {
  const int n = a.n, m = a.m, C = (int)a.C;
  const int64_t Cr = (C + 15) / 16 * 16;
  const int64_t tiles = (int64_t)a.th * a.tw;
  const int64_t nb = p / tiles, ty = (p % tiles) / a.tw, tx = p % a.tw;
  float *sxc = rxc + C, *lob = rxc + 2 * C, *hib = rxc + 3 * C;
  const float qmin = (float)a.in_min, qmax = (float)a.in_max;
  if (a.tile_scales) {  // fixed_point.input_scales for per-tile inputs, over the tile's pixels per group
    for (int c = 0; c < C; ++c) lob[c] = hib[c] = 0.0f;  // min / max with 0 included (padding; the range holds 0)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const int64_t yy = ty * m + i - a.pad_t, xx = tx * m + j - a.pad_l;
        if (yy < 0 || yy >= a.H || xx < 0 || xx >= a.W) continue;  // padding: zeros
        const float* src = a.x + ((nb * a.H + yy) * a.W + xx) * a.C;
        for (int c = 0; c < C; ++c) { lob[c] = std::min(lob[c], src[c]); hib[c] = std::max(hib[c], src[c]); }
      }
    for (int c0 = 0; c0 < C; c0 += a.in_gs) {
      const int c1 = std::min(c0 + a.in_gs, C);
      float lo = 0.0f, hi = 0.0f;
      for (int c = c0; c < c1; ++c) { lo = std::min(lo, lob[c]); hi = std::max(hi, hib[c]); }
      float r, sx, zp = 0.0f;
      if (a.zero_point) {  // [lo, hi] over all Qin = qmax - qmin steps, integer zero point
        const float span = hi - lo;
        r = span > 0 ? a.Qin / span : 0.0f;
        sx = span / a.Qin;
        zp = std::min(std::max(rha(qmin - lo * r), qmin), qmax);
      } else {  // symmetric: amax = max |x|
        const float amax = std::max(-lo, hi);
        r = amax > 0 ? a.Qin / amax : 0.0f;
        sx = amax / a.Qin;
      }
      for (int c = c0; c < c1; ++c) { rxc[c] = r; sxc[c] = sx; lob[c] = qmin - zp; hib[c] = qmax - zp; }
    }
  } else {
    for (int c = 0; c < C; ++c) {
      rxc[c] = a.rx[nb * a.rs[0] + ty * a.rs[1] + tx * a.rs[2] + c * a.rs[3]];
      sxc[c] = a.sx[nb * a.ss[0] + ty * a.ss[1] + tx * a.ss[2] + c * a.ss[3]];
      const float zp = a.zp[nb * a.zs[0] + ty * a.zs[1] + tx * a.zs[2] + c * a.zs[3]];
      lob[c] = qmin - zp;
      hib[c] = qmax - zp;
    }
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      int32_t* dst = d + (int64_t)(i * n + j) * Cr;
      const int64_t yy = ty * m + i - a.pad_t, xx = tx * m + j - a.pad_l;
      if (yy < 0 || yy >= a.H || xx < 0 || xx >= a.W) {
        for (int c = 0; c < C; ++c) dst[c] = 0;
        continue;
      }
      const float* src = a.x + ((nb * a.H + yy) * a.W + xx) * a.C;
      quant_ffb(src, rxc, dst, C, lob, hib);
    }
  // V = rshift(Bq d, kb) Bq^T, 16 channels at a time (rows Cr = C rounded up to 16 apart)
  for (int c = 0; c < C; c += 16) transform16(d + c, v + c, a.bq, n, n, a.kb, Cr);
  // V codes per channel group: one scale per tap, or one shared by the taps
  const int taps = n * n;
  int32_t lo_t[256], hi_t[256];
  const float vmin = (float)a.v_min, vmax = (float)a.v_max;
  for (int g = 0; g < a.G; ++g)
    for (int jg = 0; jg < a.J; ++jg) {
      const int c0 = g * a.cg + jg * a.gs, c1 = std::min(c0 + a.gs, (g + 1) * a.cg);
      int32_t lo_all = 0, hi_all = 0;  // min / max (0 included) per tap and over the taps
      for (int t = 0; t < taps; ++t) {
        lo_t[t] = hi_t[t] = 0;
        if (a.v_zero_point) minmax_i(v + (int64_t)t * Cr + c0, c1 - c0, lo_t[t], hi_t[t]);
        else hi_t[t] = amax_i(v + (int64_t)t * Cr + c0, c1 - c0, 0);
        lo_all = std::min(lo_all, lo_t[t]);
        hi_all = std::max(hi_all, hi_t[t]);
      }
      const float sxg = sxc[c0];
      // V8 layout per tap: blocks of PB tiles, [channel/4][PB tiles][4 channels] (the GEMM's B panel)
      const int64_t col = (int64_t)(g * a.J + jg) * a.gs4;
      const int64_t pb = (p - a.p_base) / PB, pq = (p - a.p_base) % PB;  // buffer position
      for (int t = 0; t < taps; ++t) {
        const int32_t lo = a.v_tapwise ? lo_t[t] : lo_all, hi = a.v_tapwise ? hi_t[t] : hi_all;
        // symmetric: den = max |V|; zero points: den = hi - lo (fixed_point.py, step 3)
        const float den = a.v_zero_point ? (float)((int64_t)hi - lo) : (float)hi;
        const float r = den > 0 ? a.Qv / den : 0.0f;
        const int64_t at = (((p - a.p_base) * taps + t) * a.G + g) * a.J + jg;
        a.sv[at] = den > 0 ? ((den / a.Qv) * sxg) * a.pow_kb : 0.0f;
        const float zp = a.v_zero_point ? std::min(std::max(rha(vmin - (float)lo * r), vmin), vmax) : 0.0f;
        a.zv[at] = 128 + (int32_t)zp;  // u8 code = value + zero point + 128
        uint8_t* dst = a.v8 + ((int64_t)t * a.Pp + pb * PB) * a.Cp + (col / 4) * PB * 4 + pq * 4;
        quant_iu8(v + (int64_t)t * Cr + c0, r, row, c1 - c0, vmin - zp, vmax - zp, a.zv[at]);
        for (int c = c1 - c0; c < a.gs4; ++c) row[c] = 128;
        for (int c4 = 0; c4 < a.gs4 / 4; ++c4) std::memcpy(dst + c4 * PB * 4, row + c4 * 4, 4);
      }
    }
}

// ---------------------------------------------------------------------------- phase B
// One (tap, conv group, block of PB tiles, block of 32 output channels): the int8 GEMM per
// channel group and the scaled sum over the groups into M (float32, [P][taps][G][kgp]).
static void gemm_block(const Args& a, int t, int g, int64_t p0, int kb32) {
  const int taps = a.n * a.n;
  int32_t acc[PB][32];
  for (int jg = 0; jg < a.J; ++jg) {
    const int8_t* up = a.up + ((((int64_t)t * a.G + g) * (a.kgp / 32) + kb32) * a.J + jg) * (int64_t)a.gs4 * 32;
    const uint8_t* vp = a.v8 + ((int64_t)t * a.Pp + p0) * a.Cp + (int64_t)(g * a.J + jg) * a.gs4 * PB;
#if WINOQ_VNNI
    // 8 tiles x 32 output channels in 16 named registers (arrays, or 12 tiles, were spilled by GCC)
#define WQ_FORPB(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define WQ_DECL(q) __m512i x0_##q = _mm512_setzero_si512(), x1_##q = _mm512_setzero_si512();
#define WQ_STEP(q)                                                                  \
  {                                                                                 \
    const __m512i b = _mm512_set1_epi32(*(const int32_t*)(vc + (q) * 4));           \
    x0_##q = _mm512_dpbusd_epi32(x0_##q, b, u0);                                    \
    x1_##q = _mm512_dpbusd_epi32(x1_##q, b, u1);                                    \
  }
#define WQ_FLUSH(q)                                                                                  \
  {                                                                                                  \
    const int64_t at = (((p0 + (q)) * taps + t) * a.G + g) * a.J + jg;                                   \
    const __m512 sv = _mm512_set1_ps(a.sv[at]);                                                          \
    const __m512i zo = _mm512_set1_epi32(a.zv[at]);                                                      \
    float* mrow = a.mf + (((p0 + (q)) * taps + t) * a.G + g) * (int64_t)a.kgp + ko;                  \
    __m512 y0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x0_##q, _mm512_mullo_epi32(zo, us0)));            \
    __m512 y1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x1_##q, _mm512_mullo_epi32(zo, us1)));            \
    y0 = _mm512_mul_ps(y0, _mm512_mul_ps(sv, _mm512_loadu_ps(a.su + off)));                          \
    y1 = _mm512_mul_ps(y1, _mm512_mul_ps(sv, _mm512_loadu_ps(a.su + off + 16)));                     \
    if (jg > 0) { /* the first group stores: M is not zero-filled */                              \
      y0 = _mm512_add_ps(_mm512_loadu_ps(mrow), y0);                                                 \
      y1 = _mm512_add_ps(_mm512_loadu_ps(mrow + 16), y1);                                            \
    }                                                                                                \
    _mm512_storeu_ps(mrow, y0);                                                                      \
    _mm512_storeu_ps(mrow + 16, y1);                                                                 \
  }
    static_assert(PB == 8, "the register block is written out for 8 tiles");
    WQ_FORPB(WQ_DECL)
    for (int c4 = 0; c4 < a.gs4 / 4; ++c4) {
      const uint8_t* vc = vp + c4 * PB * 4;
      const __m512i u0 = _mm512_loadu_si512(up + c4 * 128), u1 = _mm512_loadu_si512(up + c4 * 128 + 64);
      WQ_FORPB(WQ_STEP)
    }
    {  // M += float(acc - offset * sum U) * (sv * su)
      const int64_t ko = (int64_t)kb32 * 32;
      const int64_t off = (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
      const __m512i us0 = _mm512_loadu_si512(a.usum + off), us1 = _mm512_loadu_si512(a.usum + off + 16);
      WQ_FORPB(WQ_FLUSH)
    }
#undef WQ_FORPB
#undef WQ_DECL
#undef WQ_STEP
#undef WQ_FLUSH
    continue;
#else
    for (int q = 0; q < PB; ++q)
      for (int kk = 0; kk < 32; ++kk) acc[q][kk] = 0;
    for (int c4 = 0; c4 < a.gs4 / 4; ++c4)
      for (int q = 0; q < PB; ++q) {
        const uint8_t* vv = vp + c4 * PB * 4 + q * 4;
        const int8_t* uu = up + c4 * 128;
        for (int kk = 0; kk < 32; ++kk)
          acc[q][kk] += (int32_t)vv[0] * uu[kk * 4] + (int32_t)vv[1] * uu[kk * 4 + 1] +
                        (int32_t)vv[2] * uu[kk * 4 + 2] + (int32_t)vv[3] * uu[kk * 4 + 3];
      }
#endif
    // acc - offset * sum(U), times (sv * su), added to M
    const int64_t ko = (int64_t)kb32 * 32;
    const int32_t* usum = a.usum + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    const float* su = a.su + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    for (int q = 0; q < PB; ++q) {
      const int64_t p = p0 + q;
      const float svq = a.sv[((p * taps + t) * a.G + g) * a.J + jg];
      const int32_t zo = a.zv[((p * taps + t) * a.G + g) * a.J + jg];
      float* mrow = a.mf + ((p * taps + t) * a.G + g) * (int64_t)a.kgp + ko;
      for (int kk = 0; kk < 32; ++kk) {
        const float f = svq * su[kk];
        const float term = (float)(acc[q][kk] - zo * usum[kk]) * f;
        mrow[kk] = jg > 0 ? mrow[kk] + term : term;  // the first group stores: M is not zero-filled
      }
    }
  }
}

// ---------------------------------------------------------------------------- phase C
// One tile: M codes per output channel group, integer output transform, scale, bias, store.
static void output_tile(const Args& a, int64_t p, int32_t* qm, int32_t* t1, double* t64, float* rk, float* sk) {
  const int n = a.n, m = a.m, taps = n * n, K = a.G * a.kg;
  const int64_t Kr = (K + 15) / 16 * 16;
  const int64_t tiles = (int64_t)a.th * a.tw;
  const int64_t nb = p / tiles, ty = (p % tiles) / a.tw, tx = p % a.tw;
  const float* mt = a.mf + (p - a.p_base) * taps * a.G * (int64_t)a.kgp;
  for (int k = 0; k < K; ++k) rk[k] = 0.0f;  // per-channel max |M| over the taps
  for (int t = 0; t < taps; ++t)
    for (int g = 0; g < a.G; ++g) {
      const float* src = mt + ((int64_t)t * a.G + g) * a.kgp;
      float* dst = rk + g * a.kg;
      for (int kk = 0; kk < a.kg; ++kk) dst[kk] = std::max(dst[kk], std::fabs(src[kk]));
    }
  for (int k0 = 0; k0 < K; k0 += a.gsm) {
    const int k1 = std::min(k0 + a.gsm, K);
    float amax = 0.0f;
    for (int k = k0; k < k1; ++k) amax = std::max(amax, rk[k]);
    const float den = amax;
    const float r = amax > 0 ? a.Qm / den : 0.0f;
    const float s = amax > 0 ? (den / a.Qm) * a.pow_ka : 0.0f;
    for (int k = k0; k < k1; ++k) { rk[k] = r; sk[k] = s; }
  }
  for (int t = 0; t < taps; ++t)
    for (int g = 0; g < a.G; ++g) {
      const float* src = mt + ((int64_t)t * a.G + g) * a.kgp;
      const float* rr = rk + g * a.kg;
      int32_t* dst = qm + (int64_t)t * Kr + g * a.kg;
      quant_ff(src, rr, dst, a.kg, (float)a.m_min, (float)a.m_max);
    }
  // Y = rshift(Aq qm, ka) Aq^T, 16 channels at a time
  int32_t* yi = t1;  // (m*m) x Kr
  const bool wide = a.m_max > 127 || a.m_min < -128;
  if (wide)
    for (int k = 0; k < K; k += 8) transform8d(qm + k, t64 + k, a.aq, m, n, Kr);
  else
    for (int k = 0; k < K; k += 16) transform16(qm + k, yi + k, a.aq, m, n, a.ka, Kr);
  for (int r = 0; r < m; ++r) {
    const int64_t oy = ty * m + r;
    if (oy >= a.OH) break;
    for (int s = 0; s < m; ++s) {
      const int64_t ox = tx * m + s;
      if (ox >= a.OW) break;
      float* dst = a.y + ((nb * a.OH + oy) * a.OW + ox) * K;  // NHWC: the K outputs of a pixel are contiguous
      if (wide)
        dequant(t64 + (int64_t)(r * m + s) * Kr, sk, a.bias, dst, K);
      else
        dequant(yi + (int64_t)(r * m + s) * Kr, sk, a.bias, dst, K);
    }
  }
}

static double thread_ms() {  // this thread's CPU time (profiling a shared machine)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// One parallel job per block of PB tiles: input transform, the tap GEMMs over every output
// channel, requantization and output transform of those tiles, all in per-thread buffers
// that stay in L1/L2 (V panel: taps x PB x Cp bytes, M: PB x taps x K floats).
static void run(const Args& a) {
  const int n = a.n, taps = n * n, C = (int)a.C, K = a.G * a.kg;
  const int64_t P = a.P, nblocks = (P + PB - 1) / PB, nkb = a.kgp / 32;
  double prof[3] = {0, 0, 0};
  const bool profile = std::getenv("WINOQ_KERNEL_PROFILE") != nullptr;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    const size_t Cr = (C + 15) / 16 * 16, Kr = (K + 15) / 16 * 16;
    std::vector<int32_t> d(taps * Cr), v(taps * Cr);  // channel tails stay 0
    std::vector<float> rxc(4 * C);  // input multipliers, scales and code bounds of one tile
    std::vector<uint8_t> row(a.gs4 + 16), v8((size_t)taps * PB * a.Cp);
    std::vector<float> sv((size_t)PB * taps * a.G * a.J), mf((size_t)PB * taps * a.G * a.kgp);
    std::vector<int32_t> zv((size_t)PB * taps * a.G * a.J, 128);
    std::vector<int32_t> qm(taps * Kr), t1(taps * Kr);
    std::vector<double> t64(taps * Kr);
    std::vector<float> rk(Kr), sk(Kr);
    Args w = a;  // the same problem, with this thread's buffers for one block of tiles
    w.Pp = PB; w.v8 = v8.data(); w.sv = sv.data(); w.zv = zv.data(); w.mf = mf.data();
    for (int64_t blk = b; blk < e; ++blk) {
      w.p_base = blk * PB;
      const int64_t pe = std::min(P, w.p_base + PB);
      double t0 = profile ? thread_ms() : 0;
      if (pe - w.p_base < PB) {  // a partial block: the missing tiles are code 0 with scale 0
        std::fill(v8.begin(), v8.end(), (uint8_t)128);
        std::fill(sv.begin(), sv.end(), 0.0f);
        std::fill(zv.begin(), zv.end(), 128);
      }
      for (int64_t p = w.p_base; p < pe; ++p) input_tile(w, p, d.data(), v.data(), rxc.data(), row.data());
      double t1t = profile ? thread_ms() : 0;
      for (int g = 0; g < a.G; ++g)
        for (int kb32 = 0; kb32 < nkb; ++kb32)
          for (int t = 0; t < taps; ++t) gemm_block(w, t, g, 0, kb32);
      double t2t = profile ? thread_ms() : 0;
      for (int64_t p = w.p_base; p < pe; ++p) output_tile(w, p, qm.data(), t1.data(), t64.data(), rk.data(), sk.data());
      if (profile) {
        prof[0] += t1t - t0; prof[1] += t2t - t1t; prof[2] += thread_ms() - t2t;  // racy with threads: a profile aid
      }
    }
  });
  if (profile)
    std::fprintf(stderr, "winoq cpu kernel (thread CPU): input %.2f ms, gemm %.2f ms, output %.2f ms\n", prof[0], prof[1],
                 prof[2]);
}
