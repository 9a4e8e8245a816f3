// Body of the fixed-point Winograd kernel, included once per instruction set (see
// winograd_int8.cpp) inside a `#pragma GCC target` region and its own namespace.
// The arithmetic is defined in src/winoq/winograd/fixed_point.py; every float step below
// is one IEEE operation in the order given there (built with -ffp-contract=off).

static inline float rha(float t) {  // round half away from zero
  float a = std::floor(std::fabs(t) + 0.5f);
  return std::copysign(a, t);
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
  __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(t)));
  a = _mm512_roundscale_ps(_mm512_add_ps(a, _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
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

// dst[i] = rq(float(src[i]) * r) + 128 as u8
static inline void quant_iu8(const int32_t* __restrict src, float r, uint8_t* __restrict dst, int cnt, float lo, float hi) {
  int i = 0;
#if WINOQ_VNNI
  const __m512 rv = _mm512_set1_ps(r);
  const __m512i off = _mm512_set1_epi32(128);
  for (; i + 16 <= cnt; i += 16) {
    __m512i q = rq16(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(src + i)), rv), lo, hi);
    _mm_storeu_si128((__m128i*)(dst + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
  }
#endif
  for (; i < cnt; ++i) dst[i] = (uint8_t)((int32_t)rq((float)src[i] * r, lo, hi) + 128);
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

// dst[i] = float(src[i]) * s[i] (+ bias[i])
static inline void dequant(const int32_t* __restrict src, const float* __restrict s, const float* __restrict bias,
                           float* __restrict dst, int cnt) {
  int i = 0;
#if WINOQ_VNNI
  for (; i + 16 <= cnt; i += 16) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(src + i)), _mm512_loadu_ps(s + i));
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + i));
    _mm512_storeu_ps(dst + i, y);
  }
#endif
  if (bias)
    for (; i < cnt; ++i) dst[i] = (float)src[i] * s[i] + bias[i];
  else
    for (; i < cnt; ++i) dst[i] = (float)src[i] * s[i];
}

// ---------------------------------------------------------------------------- phase A
// One tile: input codes, integer input transform, V codes (u8 = code + 128) and V scales.
static void input_tile(const Args& a, int64_t p, int32_t* d, int32_t* t1, int32_t* v, float* rxc) {
  const int n = a.n, m = a.m, C = (int)a.C;
  const int64_t tiles = (int64_t)a.th * a.tw;
  const int64_t nb = p / tiles, ty = (p % tiles) / a.tw, tx = p % a.tw;
  for (int c = 0; c < C; ++c) rxc[c] = a.rx[nb * a.rs[0] + ty * a.rs[1] + tx * a.rs[2] + c * a.rs[3]];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      int32_t* dst = d + (int64_t)(i * n + j) * C;
      const int64_t yy = ty * m + i - a.pad_t, xx = tx * m + j - a.pad_l;
      if (yy < 0 || yy >= a.H || xx < 0 || xx >= a.W) {
        for (int c = 0; c < C; ++c) dst[c] = 0;
        continue;
      }
      const float* src = a.x + ((nb * a.H + yy) * a.W + xx) * a.C;
      quant_ff(src, rxc, dst, C, (float)a.in_min, (float)a.in_max);
    }
  // T = rshift(Bq d, kb): (n x n) per channel, channels innermost (vectorized)
  for (int r = 0; r < n; ++r)
    for (int j = 0; j < n; ++j) {
      int32_t* dst = t1 + (int64_t)(r * n + j) * C;
      for (int c = 0; c < C; ++c) dst[c] = 0;
      for (int i = 0; i < n; ++i) {
        const int32_t b = a.bq[r * n + i];
        if (b == 0) continue;
        const int32_t* src = d + (int64_t)(i * n + j) * C;
        for (int c = 0; c < C; ++c) dst[c] += b * src[c];
      }
      if (a.kb > 0)
        for (int c = 0; c < C; ++c) dst[c] = rshift(dst[c], a.kb);
    }
  // V = T Bq^T
  for (int r = 0; r < n; ++r)
    for (int s = 0; s < n; ++s) {
      int32_t* dst = v + (int64_t)(r * n + s) * C;
      for (int c = 0; c < C; ++c) dst[c] = 0;
      for (int j = 0; j < n; ++j) {
        const int32_t b = a.bq[s * n + j];
        if (b == 0) continue;
        const int32_t* src = t1 + (int64_t)(r * n + j) * C;
        for (int c = 0; c < C; ++c) dst[c] += b * src[c];
      }
    }
  // V codes per channel group (shared by the taps)
  const int taps = n * n;
  for (int g = 0; g < a.G; ++g)
    for (int jg = 0; jg < a.J; ++jg) {
      const int c0 = g * a.cg + jg * a.gs, c1 = std::min(c0 + a.gs, (g + 1) * a.cg);
      int32_t amax = 0;
      for (int t = 0; t < taps; ++t) amax = amax_i(v + (int64_t)t * C + c0, c1 - c0, amax);
      const float den = (float)amax * a.clip_v;
      const float r = amax > 0 ? a.Qv / den : 0.0f;
      const float sxg = a.sx[nb * a.ss[0] + ty * a.ss[1] + tx * a.ss[2] + c0 * a.ss[3]];
      a.sv[p * a.G * a.J + g * a.J + jg] = amax > 0 ? ((den / a.Qv) * sxg) * a.pow_kb : 0.0f;
      const int64_t col = (int64_t)(g * a.J + jg) * a.gs4;
      for (int t = 0; t < taps; ++t) {
        const int32_t* src = v + (int64_t)t * C;
        uint8_t* dst = a.v8 + ((int64_t)t * a.Pp + p) * a.Cp + col;
        quant_iu8(src + c0, r, dst, c1 - c0, (float)a.v_min, (float)a.v_max);
        for (int c = c1 - c0; c < a.gs4; ++c) dst[c] = 128;
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
    const uint8_t* vp = a.v8 + ((int64_t)t * a.Pp + p0) * a.Cp + (int64_t)(g * a.J + jg) * a.gs4;
#if WINOQ_VNNI
    __m512i c0[PB], c1[PB];
    for (int q = 0; q < PB; ++q) { c0[q] = _mm512_setzero_si512(); c1[q] = _mm512_setzero_si512(); }
    for (int c4 = 0; c4 < a.gs4 / 4; ++c4) {
      const __m512i u0 = _mm512_loadu_si512(up + c4 * 128), u1 = _mm512_loadu_si512(up + c4 * 128 + 64);
      for (int q = 0; q < PB; ++q) {
        const __m512i b = _mm512_set1_epi32(*(const int32_t*)(vp + q * a.Cp + c4 * 4));
        c0[q] = _mm512_dpbusd_epi32(c0[q], b, u0);
        c1[q] = _mm512_dpbusd_epi32(c1[q], b, u1);
      }
    }
    {  // M += float(acc - 128 sum U) * (sv * su), in registers
      const int64_t ko = (int64_t)kb32 * 32;
      const int64_t off = (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
      const __m512i r0 = _mm512_loadu_si512(a.corr + off), r1 = _mm512_loadu_si512(a.corr + off + 16);
      const __m512 s0 = _mm512_loadu_ps(a.su + off), s1 = _mm512_loadu_ps(a.su + off + 16);
      for (int q = 0; q < PB; ++q) {
        const int64_t p = p0 + q;
        const __m512 sv = _mm512_set1_ps(a.sv[p * a.G * a.J + g * a.J + jg]);
        float* mrow = a.mf + ((p * taps + t) * a.G + g) * (int64_t)a.kgp + ko;
        const __m512 f0 = _mm512_mul_ps(sv, s0), f1 = _mm512_mul_ps(sv, s1);
        _mm512_storeu_ps(mrow, _mm512_add_ps(_mm512_loadu_ps(mrow),
                                             _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0[q], r0)), f0)));
        _mm512_storeu_ps(mrow + 16, _mm512_add_ps(_mm512_loadu_ps(mrow + 16),
                                                  _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1[q], r1)), f1)));
      }
    }
    continue;
#else
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
#endif
    // acc - 128 sum(U), times (sv * su), added to M
    const int64_t ko = (int64_t)kb32 * 32;
    const int32_t* corr = a.corr + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    const float* su = a.su + (((int64_t)t * a.G + g) * a.J + jg) * a.kgp + ko;
    for (int q = 0; q < PB; ++q) {
      const int64_t p = p0 + q;
      const float svq = a.sv[p * a.G * a.J + g * a.J + jg];
      float* mrow = a.mf + ((p * taps + t) * a.G + g) * (int64_t)a.kgp + ko;
      for (int kk = 0; kk < 32; ++kk) {
        const float f = svq * su[kk];
        mrow[kk] = mrow[kk] + (float)(acc[q][kk] - corr[kk]) * f;
      }
    }
  }
}

// ---------------------------------------------------------------------------- phase C
// One tile: M codes per output channel group, integer output transform, scale, bias, store.
static void output_tile(const Args& a, int64_t p, int32_t* qm, int32_t* t1, float* rk, float* sk) {
  const int n = a.n, m = a.m, taps = n * n, K = a.G * a.kg;
  const int64_t tiles = (int64_t)a.th * a.tw;
  const int64_t nb = p / tiles, ty = (p % tiles) / a.tw, tx = p % a.tw;
  const float* mt = a.mf + p * taps * a.G * (int64_t)a.kgp;
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
    const float den = amax * a.clip_m;
    const float r = amax > 0 ? a.Qm / den : 0.0f;
    const float s = amax > 0 ? (den / a.Qm) * a.pow_ka : 0.0f;
    for (int k = k0; k < k1; ++k) { rk[k] = r; sk[k] = s; }
  }
  for (int t = 0; t < taps; ++t)
    for (int g = 0; g < a.G; ++g) {
      const float* src = mt + ((int64_t)t * a.G + g) * a.kgp;
      const float* rr = rk + g * a.kg;
      int32_t* dst = qm + (int64_t)t * K + g * a.kg;
      quant_ff(src, rr, dst, a.kg, (float)a.m_min, (float)a.m_max);
    }
  // T = rshift(Aq qm, ka): (m x n), Y = T Aq^T: (m x m); channels innermost
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < n; ++j) {
      int32_t* dst = t1 + (int64_t)(r * n + j) * K;
      for (int k = 0; k < K; ++k) dst[k] = 0;
      for (int i = 0; i < n; ++i) {
        const int32_t b = a.aq[r * n + i];
        if (b == 0) continue;
        const int32_t* src = qm + (int64_t)(i * n + j) * K;
        for (int k = 0; k < K; ++k) dst[k] += b * src[k];
      }
      if (a.ka > 0)
        for (int k = 0; k < K; ++k) dst[k] = rshift(dst[k], a.ka);
    }
  int32_t* yi = qm;  // reuse: (m*m) x K
  for (int r = 0; r < m; ++r)
    for (int s = 0; s < m; ++s) {
      int32_t* dst = yi + (int64_t)(r * m + s) * K;
      for (int k = 0; k < K; ++k) dst[k] = 0;
      for (int j = 0; j < n; ++j) {
        const int32_t b = a.aq[s * n + j];
        if (b == 0) continue;
        const int32_t* src = t1 + (int64_t)(r * n + j) * K;
        for (int k = 0; k < K; ++k) dst[k] += b * src[k];
      }
    }
  for (int r = 0; r < m; ++r) {
    const int64_t oy = ty * m + r;
    if (oy >= a.OH) break;
    for (int s = 0; s < m; ++s) {
      const int64_t ox = tx * m + s;
      if (ox >= a.OW) break;
      dequant(yi + (int64_t)(r * m + s) * K, sk, a.bias, rk, K);  // rk: free again, a row of K outputs
      float* dst = a.y + (nb * K * a.OH + oy) * a.OW + ox;
      const int64_t plane = a.OH * a.OW;
      for (int k = 0; k < K; ++k) dst[k * plane] = rk[k];
    }
  }
}

static double thread_ms() {  // this thread's CPU time (profiling a shared machine)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static void run(const Args& a) {
  const int n = a.n, taps = n * n, C = (int)a.C, K = a.G * a.kg;
  const int64_t P = a.P;
  auto t0 = thread_ms();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> d((size_t)taps * C), t1((size_t)taps * C), v((size_t)taps * C);
    std::vector<float> rxc(C);
    for (int64_t p = b; p < e; ++p) input_tile(a, p, d.data(), t1.data(), v.data(), rxc.data());
  });
  auto t1c = thread_ms();
  const int64_t npb = a.Pp / PB, nkb = a.kgp / 32;
  const int64_t jobs = (int64_t)npb * nkb * a.G;
  at::parallel_for(0, jobs, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t pb = i / (nkb * a.G), rest = i % (nkb * a.G);
      const int g = (int)(rest / nkb), kb32 = (int)(rest % nkb);
      for (int t = 0; t < taps; ++t) gemm_block(a, t, g, pb * PB, kb32);
    }
  });
  auto t2c = thread_ms();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> qm((size_t)taps * K), t1((size_t)taps * K);
    std::vector<float> rk(K), sk(K);
    for (int64_t p = b; p < e; ++p) output_tile(a, p, qm.data(), t1.data(), rk.data(), sk.data());
  });
  if (std::getenv("WINOQ_KERNEL_PROFILE")) {
    auto t3 = thread_ms();
    auto ms = [](double d) { return d; };
    std::fprintf(stderr, "winoq cpu kernel (thread CPU, thread 0): input %.2f ms, gemm %.2f ms, output %.2f ms\n", ms(t1c - t0), ms(t2c - t1c),
                 ms(t3 - t2c));
  }
}
