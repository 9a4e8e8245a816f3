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

#if WINOQ_VNNI
// 16 integers of the input side (int32, or int16 when the input transform runs in int16 lanes) as int32
static inline __m512i load16(const int32_t* p) { return _mm512_loadu_si512(p); }
static inline __m512i load16(const int16_t* p) { return _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)p)); }
static inline void store16(int32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
static inline void store16(int16_t* p, __m512i v) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(v)); }
#endif

// dst[i] = min(max(rha(src[i] * mul[i]), lo[i]), hi[i]): input codes with per-channel bounds
// (qmin - zp, qmax - zp: the code minus its zero point); T: int32_t or int16_t
template <typename T>
static inline void quant_ffb(const float* __restrict src, const float* __restrict mul, T* __restrict dst, int cnt,
                             const float* __restrict lo, const float* __restrict hi) {
  int i = 0;
#if WINOQ_VNNI
  for (; i + 16 <= cnt; i += 16) {
    const __m512 t = rha16(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_loadu_ps(mul + i)));
    store16(dst + i, _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(t, _mm512_loadu_ps(lo + i)), _mm512_loadu_ps(hi + i))));
  }
#endif
  for (; i < cnt; ++i) dst[i] = (T)std::min(std::max(rha(src[i] * mul[i]), lo[i]), hi[i]);
}

// dst[i] = rq(float(src[i]) * r) + off as u8 (off: 128, plus V's zero point when it has one)
template <typename T>
static inline void quant_iu8(const T* __restrict src, float r, uint8_t* __restrict dst, int cnt, float lo, float hi,
                             int32_t offset) {
  int i = 0;
#if WINOQ_VNNI
  const __m512 rv = _mm512_set1_ps(r);
  const __m512i off = _mm512_set1_epi32(offset);
  for (; i + 16 <= cnt; i += 16) {
    __m512i q = rq16(_mm512_mul_ps(_mm512_cvtepi32_ps(load16(src + i)), rv), lo, hi);
    _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
  }
#endif
  for (; i < cnt; ++i) dst[i] = (uint8_t)((int32_t)rq((float)src[i] * r, lo, hi) + offset);
}

// min and max (into lo, hi)
template <typename T>
static inline void minmax_i(const T* __restrict src, int cnt, int32_t& lo, int32_t& hi) {
  int i = 0;
#if WINOQ_VNNI
  __m512i mn = _mm512_set1_epi32(lo), mx = _mm512_set1_epi32(hi);
  for (; i + 16 <= cnt; i += 16) {
    const __m512i t = load16(src + i);
    mn = _mm512_min_epi32(mn, t);
    mx = _mm512_max_epi32(mx, t);
  }
  lo = _mm512_reduce_min_epi32(mn);
  hi = _mm512_reduce_max_epi32(mx);
#endif
  for (; i < cnt; ++i) { lo = std::min(lo, (int32_t)src[i]); hi = std::max(hi, (int32_t)src[i]); }
}

// max |src[i]|
template <typename T>
static inline int32_t amax_i(const T* __restrict src, int cnt, int32_t acc) {
  int i = 0;
#if WINOQ_VNNI
  __m512i m = _mm512_setzero_si512();
  for (; i + 16 <= cnt; i += 16) m = _mm512_max_epi32(m, _mm512_abs_epi32(load16(src + i)));
  acc = std::max(acc, _mm512_reduce_max_epi32(m));
#endif
  for (; i < cnt; ++i) acc = std::max(acc, src[i] < 0 ? -(int32_t)src[i] : (int32_t)src[i]);
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
typedef int16_t v32s __attribute__((vector_size(64), aligned(2)));
// Loads and stores go through these (the typedefs' unaligned attribute is lost on a template
// argument, so `*(V*)p` inside a template would be an aligned access).
template <typename V> struct Lanes;
template <> struct Lanes<v16i> {
  static inline v16i load(const int32_t* p) { return *(const v16i*)p; }
  static inline void store(int32_t* p, v16i v) { *(v16i*)p = v; }
};
template <> struct Lanes<v32s> {  // 32 channels of the input transform in int16 (fixed_point.Plan.input16)
  static inline v32s load(const int16_t* p) { return *(const v32s*)p; }
  static inline void store(int16_t* p, v32s v) { *(v32s*)p = v; }
};
template <> struct Lanes<v8d> {
  static inline v8d load(const int32_t* p) { return __builtin_convertvector(*(const v8i*)p, v8d); }
  static inline void store(double* p, v8d v) { *(v8d*)p = v; }
};

// acc + b x: in float64 lanes one fused multiply-add, exact like the separate ones because every
// product and sum is an integer below 2^53 (fixed_point.plan checks the bound), so the single
// rounding of the fma rounds nothing
template <typename V, typename Out>
static inline V madd(V acc, Out b, V x) { return acc + b * x; }
#if WINOQ_VNNI
template <>
inline v8d madd<v8d, double>(v8d acc, double b, v8d x) {
  return (v8d)_mm512_fmadd_pd(_mm512_set1_pd(b), (__m512d)x, (__m512d)acc);
}
#endif

// The two-pass integer transform of one lane vector of channels: for every r, s < no
//   out[r*no + s] = sum_j M[s][j] * rshift(sum_i M[r][i] * in[i*ni + j], k)
// (rows ld apart, M: no x ni; In / Out: int32, int16 (both), or int32 in and double out (exact integers,
// k = 0) like the lanes V). The tile stays in registers / L1 between the passes. NO, NI: the sizes at
// compile time (unrolled), or 0 for the run-time sizes no_, ni_ (at most 8).
template <typename V, typename In, typename Out, int NO, int NI>
static inline void transform_t(const In* in, Out* out, const int32_t* M, int k, int64_t ld, int no_ = 0,
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
        if (b) acc = madd(acc, b, col[i]);
      }
      if constexpr (std::is_integral<Out>::value) {
        constexpr int sign = 8 * sizeof(Out) - 1;
        if (k) acc = (acc + (Out)((Out)1 << (k - 1)) + (acc >> sign)) >> k;  // rshift, see above
      }
      tt[r][j] = acc;
    }
  }
  for (int r = 0; r < no; ++r)
    for (int s = 0; s < no; ++s) {
      V acc = {};
      for (int j = 0; j < ni; ++j) {
        const Out b = M[s * ni + j];
        if (b) acc = madd(acc, b, tt[r][j]);
      }
      Lanes<V>::store(out + (int64_t)(r * no + s) * ld, acc);
    }
}

// the tile shapes in use (F(2,3), F(4,3), F(6,3) and the same-size F(m,5), F(2,7)) unrolled
#define WQ_TILE_SHAPES(T) T(4, 4) T(6, 6) T(8, 8) T(2, 4) T(4, 6) T(6, 8) T(2, 6) T(4, 8) T(2, 8)

template <typename V, typename In, typename Out>
static inline void transform(const In* in, Out* out, const int32_t* M, int no, int ni, int k, int64_t ld) {
#define WQ_T(o, i) if (no == o && ni == i) return transform_t<V, In, Out, o, i>(in, out, M, k, ld);
  WQ_TILE_SHAPES(WQ_T)
#undef WQ_T
  transform_t<V, In, Out, 0, 0>(in, out, M, k, ld, no, ni);
}

// 16 channels in int32 / 32 channels in int16 / 8 channels in float64 (exact integers; no shift)
static inline void transform16(const int32_t* in, int32_t* out, const int32_t* M, int no, int ni, int k, int64_t ld) {
  transform<v16i, int32_t, int32_t>(in, out, M, no, ni, k, ld);
}
static inline void transform32s(const int16_t* in, int16_t* out, const int32_t* M, int no, int ni, int64_t ld) {
  transform<v32s, int16_t, int16_t>(in, out, M, no, ni, 0, ld);
}
static inline void transform8d(const int32_t* in, double* out, const int32_t* M, int no, int ni, int64_t ld) {
  transform<v8d, int32_t, double>(in, out, M, no, ni, 0, ld);
}

// V's multiplier r, zero point zp (stored as the u8 offset 128 + zp in zv) and real scale sv of
// each tap from its integer [lo, hi] (fixed_point.py, step 3): symmetric: den = hi (= max |V|);
// zero points: den = hi - lo; r = Q / den, sv = ((den / Q) sx) vfac[tap],
// zp = clamp(rha(qmin - lo r)). sv and zv are written `stride` apart. The AVX-512 build does 16
// taps at a time with the same IEEE operations in the same order.
static void v_scales(const Args& a, const int32_t* lo, const int32_t* hi, int taps, float sx, float* r, float* zp,
                     float* sv, int32_t* zv, int64_t stride) {
  const float vmin = (float)a.v_min, vmax = (float)a.v_max;
  int t = 0;
#if WINOQ_VNNI
  alignas(64) float sv16[16];
  alignas(64) int32_t zv16[16];
  const __m512 q = _mm512_set1_ps(a.Qv), zero = _mm512_setzero_ps();
  for (; t + 16 <= taps; t += 16) {
    const __m512i l = _mm512_loadu_si512(lo + t), h = _mm512_loadu_si512(hi + t);
    __m512 den;
    if (a.v_zero_point) {  // hi - lo exactly in float64 (it may pass 2^31), rounded once to float
      const __m512d dl = _mm512_sub_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)),
                                       _mm512_cvtepi32_pd(_mm512_castsi512_si256(l)));
      const __m512d dh = _mm512_sub_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)),
                                       _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)));
      den = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(dl)), _mm512_cvtpd_ps(dh), 1);
    } else {
      den = _mm512_cvtepi32_ps(h);
    }
    const __mmask16 pos = _mm512_cmp_ps_mask(den, zero, _CMP_GT_OQ);
    const __m512 rv = _mm512_maskz_div_ps(pos, q, den);
    const __m512 s = _mm512_maskz_mul_ps(pos, _mm512_mul_ps(_mm512_div_ps(den, q), _mm512_set1_ps(sx)),
                                         _mm512_loadu_ps(a.vfac + t));
    __m512 z = zero;
    if (a.v_zero_point)
      z = _mm512_min_ps(_mm512_max_ps(rha16(_mm512_sub_ps(_mm512_set1_ps(vmin), _mm512_mul_ps(_mm512_cvtepi32_ps(l), rv))),
                                      _mm512_set1_ps(vmin)), _mm512_set1_ps(vmax));
    _mm512_storeu_ps(r + t, rv);
    _mm512_storeu_ps(zp + t, z);
    _mm512_store_ps(sv16, s);
    _mm512_store_si512(zv16, _mm512_add_epi32(_mm512_cvttps_epi32(z), _mm512_set1_epi32(128)));
    for (int i = 0; i < 16; ++i) { sv[(t + i) * stride] = sv16[i]; zv[(t + i) * stride] = zv16[i]; }
  }
#endif
  for (; t < taps; ++t) {
    const float den = a.v_zero_point ? (float)((int64_t)hi[t] - lo[t]) : (float)hi[t];
    r[t] = den > 0 ? a.Qv / den : 0.0f;
    sv[t * stride] = den > 0 ? ((den / a.Qv) * sx) * a.vfac[t] : 0.0f;
    zp[t] = a.v_zero_point ? std::min(std::max(rha(vmin - (float)lo[t] * r[t]), vmin), vmax) : 0.0f;
    zv[t * stride] = 128 + (int32_t)zp[t];  // u8 code = value + zero point + 128
  }
}

// ---------------------------------------------------------------------------- phase A
// One tile: input codes, integer input transform, V codes (u8 = code + 128) and V scales.
// rxc: 4C floats of scratch: this tile's input multipliers, scales and code bounds per channel.
// T: the input codes and V_int in int32, or in int16 (a.in16: exact integer rows that fit).
static int64_t input_rows(int64_t C) { return (C + 31) / 32 * 32; }  // a tap's channels, whole lane vectors
template <typename T>
static void input_tile_t(const Args& a, int64_t p, T* d, T* v, float* rxc) {
  const int n = a.n, m = a.m, C = (int)a.C;
  const int64_t Cr = input_rows(C);
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
      T* dst = d + (int64_t)(i * n + j) * Cr;
      const int64_t yy = ty * m + i - a.pad_t, xx = tx * m + j - a.pad_l;
      if (yy < 0 || yy >= a.H || xx < 0 || xx >= a.W) {
        for (int c = 0; c < C; ++c) dst[c] = 0;
        continue;
      }
      const float* src = a.x + ((nb * a.H + yy) * a.W + xx) * a.C;
      quant_ffb(src, rxc, dst, C, lob, hib);
    }
  // V = rshift(Bq d, kb) Bq^T, 16 (int32) or 32 (int16) channels at a time (rows Cr apart)
  if constexpr (std::is_same<T, int16_t>::value)
    for (int c = 0; c < C; c += 32) transform32s(d + c, v + c, a.bq, n, n, Cr);
  else
    for (int c = 0; c < C; c += 16) transform16(d + c, v + c, a.bq, n, n, a.kb, Cr);
  // V codes per channel group: one scale per tap, or one shared by the taps
  const int taps = n * n;
  int32_t lo_t[256], hi_t[256];
  float r_t[256], zp_t[256];
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
      // V8 layout: [tap][tile of the chunk][Cp channels] (the GEMM broadcasts 4 channels of a tile)
      const int64_t col = (int64_t)(g * a.J + jg) * a.gs4;
      if (!a.v_tapwise)
        for (int t = 0; t < taps; ++t) { lo_t[t] = lo_all; hi_t[t] = hi_all; }
      v_scales(a, lo_t, hi_t, taps, sxg, r_t, zp_t, a.sv + (((p - a.p_base) * taps) * a.G + g) * a.J + jg,
               a.zv + (((p - a.p_base) * taps) * a.G + g) * a.J + jg, (int64_t)a.G * a.J);
      for (int t = 0; t < taps; ++t) {
        const float r = r_t[t], zp = zp_t[t];
        const int64_t at = (((p - a.p_base) * taps + t) * a.G + g) * a.J + jg;
        uint8_t* dst = a.v8 + ((int64_t)t * a.Pp + (p - a.p_base)) * a.Cp + col;
        quant_iu8(v + (int64_t)t * Cr + c0, r, dst, c1 - c0, vmin - zp, vmax - zp, a.zv[at]);
        for (int c = c1 - c0; c < a.gs4; ++c) dst[c] = 128;
      }
    }
}

static void input_tile(const Args& a, int64_t p, int32_t* d, int32_t* v, float* rxc) {
  if (a.in16) return input_tile_t<int16_t>(a, p, (int16_t*)d, (int16_t*)v, rxc);
  input_tile_t<int32_t>(a, p, d, v, rxc);
}

// ---------------------------------------------------------------------------- phase B
// One (tap, conv group, block of PB tiles, block of 32 output channels): the int8 GEMM per
// channel group and the scaled sum over the groups into M (float32, [taps][G][kgp / 32][tiles][32]:
// a register block's 8 x 32 values are one contiguous 1 KB).
#if WINOQ_VNNI
// 8 tiles x 32 output channels in 16 named registers (arrays, or 12 tiles, were spilled by GCC);
// STEPS: the group's 4-channel steps at compile time (8: groups of 32 channels, the default), fully
// unrolled, because GCC copies the accumulators around the tied vpdpbusd operand in a run-time loop
// (measured 1.5-2x slower), or 0 for run-time group lengths.
template <int STEPS>
static void gemm_block_vnni(const Args& a, int t, int g, int64_t p0, int kb32, int j0, int j1) {
  const int taps = a.n * a.n, J = a.J, G = a.G, steps = STEPS ? STEPS : a.gs4 / 4;
  const int64_t Cp = a.Cp, kgp = a.kgp, ko = (int64_t)kb32 * 32;
  const int64_t sv_q = (int64_t)taps * G * J, m_q = 32;  // strides per tile
  const int8_t* up = a.up + ((((int64_t)t * G + g) * (kgp / 32) + kb32) * J + j0) * (int64_t)a.gs4 * 32;
  const uint8_t* vp = a.v8 + ((int64_t)t * a.Pp + p0) * Cp + (int64_t)(g * J + j0) * a.gs4;
  const float* svp = a.sv + ((p0 * taps + t) * G + g) * (int64_t)J;
  const int32_t* zvp = a.zv + ((p0 * taps + t) * G + g) * (int64_t)J;
  float* mp = a.mf + ((((int64_t)t * G + g) * (kgp / 32) + kb32) * a.Pp + p0) * 32;  // 8 rows of 32, contiguous
  const int64_t mx_q = (int64_t)G * kgp;
  float* mxp = a.mx + p0 * mx_q + (int64_t)g * kgp + ko;  // [tiles][G][kgp]
  const int64_t uoff = (((int64_t)t * G + g) * J + j0) * kgp + ko;
  const float *su = a.su + uoff, *usf = a.usf ? a.usf + uoff : nullptr;
  const int32_t* usum = a.usum + uoff;
  for (int jg = j0; jg < j1; ++jg, up += (int64_t)a.gs4 * 32, vp += a.gs4, su += kgp, usum += kgp) {
#define WQ_FORPB(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define WQ_DECL(q) __m512i x0_##q = _mm512_setzero_si512(), x1_##q = _mm512_setzero_si512();
#define WQ_STEP(q)                                                          \
  {                                                                         \
    const __m512i b = _mm512_set1_epi32(*(const int32_t*)(vc + (q) * Cp)); \
    x0_##q = _mm512_dpbusd_epi32(x0_##q, b, u0);                            \
    x1_##q = _mm512_dpbusd_epi32(x1_##q, b, u1);                            \
  }
#define WQ_FLUSH(q)                                                                           \
  {                                                                                           \
    const float* svq = svp + (q) * sv_q + jg;                                                 \
    const int32_t zvq = zvp[(q) * sv_q + jg];                                                 \
    float* mrow = mp + (q) * m_q;                                                             \
    __m512 y0, y1;                                                                            \
    if (usf) { /* acc - offset * sum U in one rounding: exact below 2^24 (run() checks) */    \
      const __m512 zf = _mm512_set1_ps((float)zvq);                                           \
      y0 = _mm512_fnmadd_ps(zf, uf0, _mm512_cvtepi32_ps(x0_##q));                             \
      y1 = _mm512_fnmadd_ps(zf, uf1, _mm512_cvtepi32_ps(x1_##q));                             \
    } else {                                                                                  \
      const __m512i zo = _mm512_set1_epi32(zvq);                                              \
      y0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x0_##q, _mm512_mullo_epi32(zo, us0)));         \
      y1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(x1_##q, _mm512_mullo_epi32(zo, us1)));         \
    }                                                                                         \
    const __m512 sv = _mm512_set1_ps(*svq);                                                   \
    y0 = _mm512_mul_ps(y0, _mm512_mul_ps(sv, su0));                                           \
    y1 = _mm512_mul_ps(y1, _mm512_mul_ps(sv, su1));                                           \
    if (jg > 0) { /* the first group stores: M is not zero-filled */                          \
      y0 = _mm512_add_ps(_mm512_loadu_ps(mrow), y0);                                          \
      y1 = _mm512_add_ps(_mm512_loadu_ps(mrow + 16), y1);                                     \
    }                                                                                         \
    _mm512_storeu_ps(mrow, y0);                                                               \
    _mm512_storeu_ps(mrow + 16, y1);                                                          \
    if (jg == J - 1) { /* M is final: its max |M| over the taps, per tile and channel */      \
      float* mx = mxp + (q) * mx_q;                                                           \
      y0 = _mm512_abs_ps(y0);                                                                 \
      y1 = _mm512_abs_ps(y1);                                                                 \
      if (t > 0) {                                                                            \
        y0 = _mm512_max_ps(_mm512_loadu_ps(mx), y0);                                          \
        y1 = _mm512_max_ps(_mm512_loadu_ps(mx + 16), y1);                                     \
      }                                                                                       \
      _mm512_storeu_ps(mx, y0);                                                               \
      _mm512_storeu_ps(mx + 16, y1);                                                          \
    }                                                                                         \
  }
    static_assert(PB == 8, "the register block is written out for 8 tiles");
    WQ_FORPB(WQ_DECL)
#pragma GCC unroll 16
    for (int c4 = 0; c4 < steps; ++c4) {
      const uint8_t* vc = vp + c4 * 4;
      const __m512i u0 = _mm512_loadu_si512(up + c4 * 128), u1 = _mm512_loadu_si512(up + c4 * 128 + 64);
      WQ_FORPB(WQ_STEP)
    }
    const __m512 su0 = _mm512_loadu_ps(su), su1 = _mm512_loadu_ps(su + 16);
    const __m512 uf0 = usf ? _mm512_loadu_ps(usf + (int64_t)(jg - j0) * kgp) : su0,
                 uf1 = usf ? _mm512_loadu_ps(usf + (int64_t)(jg - j0) * kgp + 16) : su1;
    const __m512i us0 = _mm512_loadu_si512(usum), us1 = _mm512_loadu_si512(usum + 16);
    WQ_FORPB(WQ_FLUSH)
#undef WQ_FORPB
#undef WQ_DECL
#undef WQ_STEP
#undef WQ_FLUSH
  }
}
#endif

// groups j0 .. j1 - 1 of one register block (M accumulates the groups in order, as the twin does)
static void gemm_block(const Args& a, int t, int g, int64_t p0, int kb32, int j0, int j1) {
#if WINOQ_VNNI
  if (a.gs4 == 32) return gemm_block_vnni<8>(a, t, g, p0, kb32, j0, j1);
  return gemm_block_vnni<0>(a, t, g, p0, kb32, j0, j1);
#else
  const int taps = a.n * a.n;
  int32_t acc[PB][32];
  for (int jg = j0; jg < j1; ++jg) {
    const int8_t* up = a.up + ((((int64_t)t * a.G + g) * (a.kgp / 32) + kb32) * a.J + jg) * (int64_t)a.gs4 * 32;
    const uint8_t* vp = a.v8 + ((int64_t)t * a.Pp + p0) * a.Cp + (int64_t)(g * a.J + jg) * a.gs4;
    for (int q = 0; q < PB; ++q)
      for (int kk = 0; kk < 32; ++kk) acc[q][kk] = 0;
    for (int c4 = 0; c4 < a.gs4 / 4; ++c4)
      for (int q = 0; q < PB; ++q) {
        const uint8_t* vv = vp + q * a.Cp + c4 * 4;
        const int8_t* uu = up + c4 * 128;
        for (int kk = 0; kk < 32; ++kk)
          acc[q][kk] += (int32_t)vv[0] * uu[kk * 4] + (int32_t)vv[1] * uu[kk * 4 + 1] +
                        (int32_t)vv[2] * uu[kk * 4 + 2] + (int32_t)vv[3] * uu[kk * 4 + 3];
      }
    // acc - offset * sum(U), times (sv * su), added to M
    const int64_t ko = (int64_t)kb32 * 32;
    const int32_t* usum = a.usum + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    const float* su = a.su + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    for (int q = 0; q < PB; ++q) {
      const int64_t p = p0 + q;
      const float svq = a.sv[((p * taps + t) * a.G + g) * a.J + jg];
      const int32_t zo = a.zv[((p * taps + t) * a.G + g) * a.J + jg];
      float* mrow = a.mf + ((((int64_t)t * a.G + g) * (a.kgp / 32) + kb32) * a.Pp + p) * 32;
      for (int kk = 0; kk < 32; ++kk) {
        const float f = svq * su[kk];
        const float term = (float)(acc[q][kk] - zo * usum[kk]) * f;
        mrow[kk] = jg > 0 ? mrow[kk] + term : term;  // the first group stores: M is not zero-filled
        if (jg == a.J - 1) {  // M is final: its max |M| over the taps
          float* mx = a.mx + (p * a.G + g) * (int64_t)a.kgp + ko + kk;
          *mx = t > 0 ? std::max(*mx, std::fabs(mrow[kk])) : std::fabs(mrow[kk]);
        }
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------- phase C
// One tile: M codes per output channel group, integer output transform, scale, bias, store.
// M's multipliers rk and scales sk per output channel of one tile: one per channel group of
// gsm over the taps' max |M| (taken by the GEMM's last flush).
static void m_scales(const Args& a, int64_t p, float* rk, float* sk) {
  const int K = a.G * a.kg;
  const int64_t pl = p - a.p_base;
  for (int g = 0; g < a.G; ++g)
    std::memcpy(rk + g * a.kg, a.mx + (pl * a.G + g) * (int64_t)a.kgp, sizeof(float) * a.kg);
  for (int k0 = 0; k0 < K; k0 += a.gsm) {
    const int k1 = std::min(k0 + a.gsm, K);
    float amax = 0.0f;
    for (int k = k0; k < k1; ++k) amax = std::max(amax, rk[k]);
    const float den = amax;
    const float r = amax > 0 ? a.Qm / den : 0.0f;
    const float s = amax > 0 ? (den / a.Qm) * a.pow_ka : 0.0f;
    for (int k = k0; k < k1; ++k) { rk[k] = r; sk[k] = s; }
  }
}

// One tile's 32-channel piece (conv group g, block kb): M codes of the n x n taps, the output
// transform, scale, bias and store (codes and outputs stay in L1: qm, t1: taps x 32, t64: m*m x 32).
// M is [taps][G][kgp / 32][chunk tiles][32], so a piece's taps are 32 * chunk floats apart.
static void output_piece(const Args& a, int64_t p, int g, int kb, int32_t* qm, int32_t* t1, double* t64,
                         const float* rk, const float* sk) {
  const int n = a.n, m = a.m, taps = n * n, K = a.G * a.kg;
  const int64_t tiles = (int64_t)a.th * a.tw;
  const int64_t nb = p / tiles, ty = (p % tiles) / a.tw, tx = p % a.tw;
  const int64_t pl = p - a.p_base, nkb = a.kgp / 32, piece = 32 * a.Pp;
  const float* mt = a.mf + pl * 32;
  const bool wide = a.m_max > 127 || a.m_min < -128;
  const int k0 = g * a.kg + kb * 32, cnt = std::min(32, a.kg - kb * 32);
  for (int t = 0; t < taps; ++t) {
    int32_t* dst = qm + t * 32;
    const float* src = mt + (((int64_t)t * a.G + g) * nkb + kb) * piece;
    // the next tile's piece is the next 128 bytes: one of ~taps * K / 32 streams, too many
    // for the hardware prefetcher at K = 640
    _mm_prefetch((const char*)(src + 32), _MM_HINT_T0);
    _mm_prefetch((const char*)(src + 48), _MM_HINT_T0);
    quant_ff(src, rk + k0, dst, cnt, (float)a.m_min, (float)a.m_max);
    for (int kk = cnt; kk < 32; ++kk) dst[kk] = 0;
  }
  // Y = rshift(Aq qm, ka) Aq^T
  if (wide)
    for (int k = 0; k < 32; k += 8) transform8d(qm + k, t64 + k, a.aq, m, n, 32);
  else
    for (int k = 0; k < 32; k += 16) transform16(qm + k, t1 + k, a.aq, m, n, a.ka, 32);
  for (int r = 0; r < m; ++r) {
    const int64_t oy = ty * m + r;
    if (oy >= a.OH) break;
    for (int s = 0; s < m; ++s) {
      const int64_t ox = tx * m + s;
      if (ox >= a.OW) break;
      float* dst = a.y + ((nb * a.OH + oy) * a.OW + ox) * K + k0;  // NHWC: a pixel's K outputs are contiguous
      const float* bias = a.bias ? a.bias + k0 : nullptr;
      if (wide)
        dequant(t64 + (r * m + s) * 32, sk + k0, bias, dst, cnt);
      else
        dequant(t1 + (r * m + s) * 32, sk + k0, bias, dst, cnt);
    }
  }
}

static double thread_ms() {  // this thread's CPU time (profiling a shared machine)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Chunks of tiles: one parallel job per chunk runs the input transform of its tiles, then the tap
// GEMMs (per tap and block of 32 output channels, that slice of U stays in L1 while every
// 8-tile register block of the chunk passes over it: U is read once per chunk, not once per 8
// tiles), then the requantization and output transform; per-thread buffers (V: taps x chunk x Cp
// bytes, M: chunk x taps x K floats). The chunk length trades U's re-reads against M's footprint.
static int64_t chunk_bytes_per_tile(const Args& a) { return (int64_t)a.n * a.n * (a.Cp + 4 * (int64_t)a.G * a.kgp); }
// about as many bytes of M per chunk as of U (C / 4 tiles), at least 16 tiles (measured: 16-64
// tiles within noise at C = 128-256; at C = 640 the whole image, 1.8x faster than 8 tiles)
static int64_t chunk_target(const Args& a) { return std::max<int64_t>(16, a.C / 4); }
constexpr int64_t kChunkBytes = 8 << 20;  // the buffers of one chunk stay under ~8 MB

static int64_t chunk_tiles(const Args& a, int threads) {
  int64_t pc = std::min<int64_t>(chunk_target(a), (a.P + threads - 1) / threads);  // every thread gets work
  pc = std::min<int64_t>(pc, std::max<int64_t>(PB, kChunkBytes / chunk_bytes_per_tile(a)));
  if (const char* e = std::getenv("WINOQ_KERNEL_CHUNK")) pc = std::max(1, std::atoi(e));  // tuning aid
  return std::max<int64_t>(PB, (pc + PB - 1) / PB * PB);
}

// The buffers of one chunk of PC tiles (a multiple of PB): V's codes, scales and offsets, M, its
// max over the taps, and M's multipliers and scales; `bind` points a copy of the problem at them.
struct ChunkBuffers {
  std::vector<uint8_t> v8;
  std::vector<float> sv, mf, mx, rk, sk;
  std::vector<int32_t> zv;
  int64_t PC;
  ChunkBuffers(const Args& a, int64_t pc)
      : v8((size_t)a.n * a.n * pc * a.Cp, 128), sv((size_t)pc * a.n * a.n * a.G * a.J, 0.0f),
        mf((size_t)pc * a.n * a.n * a.G * a.kgp), mx((size_t)pc * a.G * a.kgp), rk((size_t)pc * a.G * a.kg),
        sk((size_t)pc * a.G * a.kg), zv((size_t)pc * a.n * a.n * a.G * a.J, 128), PC(pc) {}  // padding tiles: code 0, scale 0
  Args bind(const Args& a, int64_t p_base) {
    Args w = a;
    w.Pp = PC; w.p_base = p_base; w.v8 = v8.data(); w.sv = sv.data(); w.zv = zv.data(); w.mf = mf.data(); w.mx = mx.data();
    return w;
  }
};

// One thread's scratch for the per-tile phases: the input tile's codes and V (taps x C, int32),
// its multipliers, scales and bounds, and one 32-channel piece of M codes / outputs.
struct TileScratch {
  std::vector<int32_t> d, v, qm, t1;
  std::vector<float> rxc;
  std::vector<double> t64;
  explicit TileScratch(const Args& a)
      : d((size_t)a.n * a.n * input_rows(a.C)), v(d.size()), qm((size_t)a.n * a.n * 32), t1(qm.size()),
        rxc(4 * a.C), t64(qm.size()) {}  // channel tails of d and v stay 0
};

// per tap and 32 output channels, the reduction in blocks of JB channel groups (<= 8 KB of U,
// which stays in L1 while every register block of the np tiles passes over it)
static void gemm_slice(const Args& w, int t, int g, int kb32, int64_t np) {
  const int JB = std::max(1, 8192 / (w.gs4 * 32));
  for (int j0 = 0; j0 < w.J; j0 += JB)
    for (int64_t p0 = 0; p0 < np; p0 += PB) gemm_block(w, t, g, p0, kb32, j0, std::min(w.J, j0 + JB));
}

// M's scales and every 32-channel piece of one tile (rk, sk: the chunk's, PC x K)
static void output_tile(const Args& w, int64_t p, TileScratch& ts, float* rk, float* sk) {
  const int K = w.G * w.kg, nkb = w.kgp / 32;
  rk += (p - w.p_base) * K;
  sk += (p - w.p_base) * K;
  m_scales(w, p, rk, sk);
  for (int g = 0; g < w.G; ++g)
    for (int kb = 0; kb < nkb; ++kb) output_piece(w, p, g, kb, ts.qm.data(), ts.t1.data(), ts.t64.data(), rk, sk);
}

// Few tiles for many channels (a batch-1 layer at 640+ channels on several threads): with one
// chunk per thread every thread would read all of U for a handful of tiles. Instead one chunk
// holds every tile and the threads split each phase: tiles for the transforms, blocks of 32
// output channels for the GEMM (each thread reads its part of U once; a block's taps stay in one
// thread, in order, so M's max over the taps is taken as in run()).
static void run_shared(const Args& a) {
  const int taps = a.n * a.n, nkb = a.kgp / 32;
  ChunkBuffers buf(a, (a.P + PB - 1) / PB * PB);
  const Args w = buf.bind(a, 0);
  at::parallel_for(0, a.P, 1, [&](int64_t b, int64_t e) {
    TileScratch ts(a);
    for (int64_t p = b; p < e; ++p) input_tile(w, p, ts.d.data(), ts.v.data(), ts.rxc.data());
  });
  at::parallel_for(0, (int64_t)a.G * nkb, 1, [&](int64_t b, int64_t e) {
    for (int64_t gk = b; gk < e; ++gk)
      for (int t = 0; t < taps; ++t) gemm_slice(w, t, (int)(gk / nkb), (int)(gk % nkb), buf.PC);
  });
  at::parallel_for(0, a.P, 1, [&](int64_t b, int64_t e) {
    TileScratch ts(a);
    for (int64_t p = b; p < e; ++p) output_tile(w, p, ts, buf.rk.data(), buf.sk.data());
  });
}

static void run(const Args& a) {
  const int taps = a.n * a.n, nkb = a.kgp / 32;
  const int64_t P = a.P;
  const int threads = at::get_num_threads();
  if (threads > 1 && !std::getenv("WINOQ_KERNEL_CHUNK") && (P + threads - 1) / threads < chunk_target(a) &&
      P * chunk_bytes_per_tile(a) <= kChunkBytes)
    return run_shared(a);  // one chunk per thread would be cut short to give every thread tiles
  const int64_t PC = chunk_tiles(a, threads), nchunks = (P + PC - 1) / PC;
  double prof[3] = {0, 0, 0};
  const bool profile = std::getenv("WINOQ_KERNEL_PROFILE") != nullptr;
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    ChunkBuffers buf(a, PC);
    TileScratch ts(a);
    for (int64_t chunk = b; chunk < e; ++chunk) {
      const Args w = buf.bind(a, chunk * PC);
      const int64_t pe = std::min(P, w.p_base + PC), np = (pe - w.p_base + PB - 1) / PB * PB;
      double t0 = profile ? thread_ms() : 0;
      if (pe - w.p_base < np) {  // a partial register block: the missing tiles are code 0 with scale 0
        for (int t = 0; t < taps; ++t)
          std::memset(buf.v8.data() + ((size_t)t * PC + (pe - w.p_base)) * a.Cp, 128, (size_t)(np - (pe - w.p_base)) * a.Cp);
        const size_t first = (size_t)(pe - w.p_base) * taps * a.G * a.J;
        std::fill(buf.sv.begin() + first, buf.sv.end(), 0.0f);
        std::fill(buf.zv.begin() + first, buf.zv.end(), 128);
      }
      for (int64_t p = w.p_base; p < pe; ++p) input_tile(w, p, ts.d.data(), ts.v.data(), ts.rxc.data());
      double t1t = profile ? thread_ms() : 0;
      for (int g = 0; g < a.G; ++g)
        for (int t = 0; t < taps; ++t)
          for (int kb32 = 0; kb32 < nkb; ++kb32) gemm_slice(w, t, g, kb32, np);
      double t2t = profile ? thread_ms() : 0;
      for (int64_t p = w.p_base; p < pe; ++p) output_tile(w, p, ts, buf.rk.data(), buf.sk.data());
      if (profile) {
        prof[0] += t1t - t0; prof[1] += t2t - t1t; prof[2] += thread_ms() - t2t;  // racy with threads: a profile aid
      }
    }
  });
  if (profile)
    std::fprintf(stderr, "winoq cpu kernel (thread CPU): input %.2f ms, gemm %.2f ms, output %.2f ms (chunks of %ld tiles)\n",
                 prof[0], prof[1], prof[2], (long)PC);
}
