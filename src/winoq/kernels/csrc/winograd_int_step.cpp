// The integer Winograd step of winoq's integer-only graphs, compiled for CPUs.
//
// Computes winoq.integer.winograd.IntWinogradConv2d.forward with V in block floating point
// ("tile" V scales: a power-of-two exponent per tile, tap and group of g input channels), bit for
// bit: int8 codes in, int32 accumulator out. Every scale is static except V's exponents, so
// nothing here is floating point except the exact-integer output transform (float64 lanes hold
// its integers exactly, every value < 2^53, checked by the caller).
//
// Per chunk of tiles (one parallel job each):
//  A. input transform of each tile from a zero-padded NHWC int8 copy of the input, in int16 lanes
//     (32 channels per vector; exact integer rows of F(2,3) / F(4,3)) or int32 lanes (16; F(6,3),
//     or fixed-point rows with a first-pass shift); per tap and channel group the exponent
//     e = max(0, bitlen(max |V|) - bitlen(v_range)) (bitlen of the OR of |V|: the same bit), the
//     codes rshift(V, e) rounded half away from zero, clamped, stored as u8 (code + 128) in
//     [tap][tile][channels];
//  B. per tap an int8 GEMM with VNNI vpdpbusd, U pre-packed as [tap][K/32][group][g/4][32][4]; each
//     group's int32 sums start at -128 sum(U) (removing the u8 offset), are shifted left by their
//     exponent and added to the tap sum in int32 (the caller checks the worst case fits); then
//     the rounding right shift pre_shift, and the dyadic requantization of M per tap and output
//     channel ((z b + 2^(c-1)) >> c in int64 lanes) clamped to M's range, stored int16 as
//     [tile][tap][K];
//  C. output transform Aq M Aq^T in float64 lanes, rounding shift so, bias, int32 NHWC store.
// The instruction set is picked at run time: AVX-512 VNNI, or portable C++ (also compiled for
// AVX2, which the compiler vectorizes where it can).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

#include <immintrin.h>

#include "cpu_isa.h"

namespace {

struct StepArgs {
  const int8_t* xp; int64_t N, Hp, Wp, Cp;  // zero-padded NHWC codes, channels padded to J * g
  int m, n, th, tw; int64_t OH, OW, P;
  const int32_t* bq; int sb; int in16;      // n x n input rows, first-pass shift, int16 lanes
  int g, J, v_range, v_bits;                // V group, groups, V's largest code and its bit length
  const int8_t* u;                          // (taps, K, Cp) codes, zero beyond C (portable path)
  const int8_t* up; const int32_t* uoff;    // packed U; -128 sum U as [taps][J][Kp]
  int64_t K, Kp;
  int pre_shift; int wide;                  // wide: int64 tap sums (the worst case leaves int32)
  const int64_t* mb; const int64_t* mc; const int64_t* mhalf;  // [taps][Kp]: multiplier, shift, 2^(c-1)
  int m_range;
  const double* aq; int so;                 // m x n output rows (exact integers), final shift
  const int32_t* bias;                      // [Kp]
  int32_t* y;                               // (N, OH, OW, K)
  int64_t chunk;                            // tiles per parallel job
};

inline void tile_origin(const StepArgs& a, int64_t p, int64_t& b, int& ty, int& tx) {
  b = p / ((int64_t)a.th * a.tw);
  const int64_t r = p % ((int64_t)a.th * a.tw);
  ty = (int)(r / a.tw); tx = (int)(r % a.tw);
}

// per-phase thread CPU seconds of the vector path (profile(); off unless WINOQ_KERNEL_PROFILE is set)
double g_phase[3] = {0, 0, 0};
const bool g_profile = std::getenv("WINOQ_KERNEL_PROFILE") != nullptr;
inline double thread_seconds() {
  timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

inline int bit_length(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

inline int64_t rshift_away(int64_t t, int k) {  // t / 2^k rounded half away from zero
  if (k == 0) return t;
  const int64_t half = (int64_t)1 << (k - 1);
  return t >= 0 ? (t + half) >> k : -((half - t) >> k);
}

}  // namespace

// ------------------------------------------------------------------------------------------ portable
namespace step_portable {
#include "winograd_int_step_portable.h"
}  // namespace step_portable

#pragma GCC push_options
#pragma GCC target("avx2")
namespace step_avx2 {
#include "winograd_int_step_portable.h"
}  // namespace step_avx2
#pragma GCC pop_options


// ------------------------------------------------------------------------------------------ AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace step_vnni {

// lanes of the input transform: 32 x int16 or 16 x int32 per zmm
struct L16 {
  static constexpr int L = 32;
  static __m512i load8(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512i mul(__m512i a, int c) { return _mm512_mullo_epi16(a, _mm512_set1_epi16((short)c)); }
  static __m512i add(__m512i a, __m512i b) { return _mm512_add_epi16(a, b); }
  static __m512i sub(__m512i a, __m512i b) { return _mm512_sub_epi16(a, b); }
  static __m512i abs(__m512i a) { return _mm512_abs_epi16(a); }
  static uint32_t or_all(__m512i a) { const uint32_t o = (uint32_t)_mm512_reduce_or_epi32(a); return (o | (o >> 16)) & 0xFFFFu; }
  static __m512i rshift_away(__m512i v, int k) {  // only used with k == 0 (int16 rows take no shift)
    (void)k; return v;
  }
  static void store_codes(uint8_t* dst, __m512i v, int e, int vr) {
    __m512i a = _mm512_abs_epi16(v);
    if (e) a = _mm512_srl_epi16(_mm512_add_epi16(a, _mm512_set1_epi16((short)(1 << (e - 1)))), _mm_cvtsi32_si128(e));
    a = _mm512_min_epi16(a, _mm512_set1_epi16((short)vr));
    const __m512i off = _mm512_set1_epi16(128);
    const __m512i q = _mm512_mask_blend_epi16(_mm512_movepi16_mask(v), _mm512_add_epi16(off, a), _mm512_sub_epi16(off, a));
    _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi16_epi8(q));
  }
};

struct L32 {
  static constexpr int L = 16;
  static __m512i load8(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static __m512i mul(__m512i a, int c) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(c)); }
  static __m512i add(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
  static __m512i sub(__m512i a, __m512i b) { return _mm512_sub_epi32(a, b); }
  static __m512i abs(__m512i a) { return _mm512_abs_epi32(a); }
  static uint32_t or_all(__m512i a) { return (uint32_t)_mm512_reduce_or_epi32(a); }
  static __m512i shift_abs(__m512i a, int k) {
    return _mm512_srl_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(1 << (k - 1))), _mm_cvtsi32_si128(k));
  }
  static __m512i rshift_away(__m512i v, int k) {
    if (k == 0) return v;
    const __m512i a = shift_abs(_mm512_abs_epi32(v), k);
    return _mm512_mask_sub_epi32(a, _mm512_movepi32_mask(v), _mm512_setzero_si512(), a);
  }
  static void store_codes(uint8_t* dst, __m512i v, int e, int vr) {
    __m512i a = _mm512_abs_epi32(v);
    if (e) a = shift_abs(a, e);
    a = _mm512_min_epi32(a, _mm512_set1_epi32(vr));
    const __m512i off = _mm512_set1_epi32(128);
    const __m512i q = _mm512_mask_blend_epi32(_mm512_movepi32_mask(v), _mm512_add_epi32(off, a), _mm512_sub_epi32(off, a));
    _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(q));
  }
};

// Phase A: V codes (u8) [tap][tile][Cp] and exponents [tap][tile][J] of tiles p0 .. p1.
template <class LN, int N_>
void input_phase(const StepArgs& a, int64_t p0, int64_t p1, uint8_t* v8, uint8_t* ex) {
  constexpr int n = N_, T = n * n, L = LN::L;
  const int64_t np = p1 - p0;
  const int vpg = a.g / L;  // vectors per group
  alignas(64) __m512i vb[T * 4];  // V of one group (up to 4 vectors of a 64/128-channel group), tap-major
  int bq[n * n];
  for (int i = 0; i < n * n; ++i) bq[i] = a.bq[i];
  for (int64_t p = p0; p < p1; ++p) {
    int64_t b; int ty, tx; tile_origin(a, p, b, ty, tx);
    const int8_t* base = a.xp + ((b * a.Hp + (int64_t)ty * a.m) * a.Wp + (int64_t)tx * a.m) * a.Cp;
    for (int j = 0; j < a.J; ++j) {
      uint32_t orr[T] = {0};
      for (int cv = 0; cv < vpg; ++cv) {
        const int64_t c0 = (int64_t)j * a.g + (int64_t)cv * L;
        __m512i t1[n][n];  // first pass: t1[r][col]
        for (int col = 0; col < n; ++col) {
          __m512i d[n];
          for (int i = 0; i < n; ++i) d[i] = LN::load8(base + ((int64_t)i * a.Wp + col) * a.Cp + c0);
          for (int r = 0; r < n; ++r) {
            __m512i s = _mm512_setzero_si512();
            for (int i = 0; i < n; ++i) {
              const int c = bq[r * n + i];
              if (c == 0) continue;
              s = c == 1 ? LN::add(s, d[i]) : c == -1 ? LN::sub(s, d[i]) : LN::add(s, LN::mul(d[i], c));
            }
            t1[r][col] = LN::rshift_away(s, a.sb);
          }
        }
        for (int r = 0; r < n; ++r)
          for (int q = 0; q < n; ++q) {
            __m512i s = _mm512_setzero_si512();
            for (int col = 0; col < n; ++col) {
              const int c = bq[q * n + col];
              if (c == 0) continue;
              s = c == 1 ? LN::add(s, t1[r][col]) : c == -1 ? LN::sub(s, t1[r][col]) : LN::add(s, LN::mul(t1[r][col], c));
            }
            vb[(r * n + q) * vpg + cv] = s;
            orr[r * n + q] |= LN::or_all(LN::abs(s));
          }
      }
      for (int t = 0; t < T; ++t) {
        const int e = std::max(0, bit_length(orr[t]) - a.v_bits);
        ex[((int64_t)t * np + (p - p0)) * a.J + j] = (uint8_t)e;
        uint8_t* dst = v8 + ((int64_t)t * np + (p - p0)) * a.Cp + (int64_t)j * a.g;
        for (int cv = 0; cv < vpg; ++cv) LN::store_codes(dst + cv * L, vb[t * vpg + cv], e, a.v_range);
      }
    }
  }
}

inline __m512i rshift_away64(__m512i v, int k) {  // int64 lanes: v / 2^k rounded half away from zero
  if (k == 0) return v;
  const __m512i a = _mm512_srl_epi64(_mm512_add_epi64(_mm512_abs_epi64(v), _mm512_set1_epi64((int64_t)1 << (k - 1))),
                                     _mm_cvtsi32_si128(k));
  return _mm512_mask_sub_epi64(a, _mm512_movepi64_mask(v), _mm512_setzero_si512(), a);
}

// M codes of 8 output channels from their tap sums z (int64 lanes, within int32): the dyadic
// (z b + 2^(c-1)) >> c, clamped to M's range, stored as int16.
inline void requantize_m(const StepArgs& a, int64_t k, __m512i z, int16_t* dst) {
  __m512i r = _mm512_mul_epi32(z, _mm512_loadu_si512(a.mb + k));
  r = _mm512_srav_epi64(_mm512_add_epi64(r, _mm512_loadu_si512(a.mhalf + k)), _mm512_loadu_si512(a.mc + k));
  r = _mm512_min_epi64(_mm512_max_epi64(r, _mm512_set1_epi64(-a.m_range)), _mm512_set1_epi64(a.m_range));
  _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi64_epi16(r));
}

// Phase B for one tap, 32 output channels (kb) and TB tiles: tap sums, requantized to int16 M.
// WIDE: the sums of shifted group sums are kept in int64 (the layer's worst case leaves int32).
// G4: the group's 4-channel steps known at compile time (8 for the default 32 channels; 0: a.g / 4
// at run time). Unrolled, the accumulators stay in place; in a run-time loop GCC copies them around
// the tied vpdpbusd operand every step.
template <int TB, bool WIDE, int G4>
inline void gemm_block(const StepArgs& a, int t, int64_t kb, const uint8_t* v, const uint8_t* ex, int16_t* mq,
                       int64_t mq_tile_stride) {
  const int J = a.J, g4 = G4 ? G4 : a.g / 4;
  __m512i tot[TB][2];
  alignas(64) int64_t wide[WIDE ? TB : 1][32];
  for (int i = 0; i < TB; ++i) tot[i][0] = tot[i][1] = _mm512_setzero_si512();
  if (WIDE) std::memset(wide, 0, sizeof(wide));
  const int8_t* ut = a.up + (((int64_t)t * (a.Kp / 32) + kb) * J) * (int64_t)g4 * 128;
  const int32_t* off = a.uoff + (int64_t)t * J * a.Kp + kb * 32;
  for (int j = 0; j < J; ++j) {
    const __m512i o0 = _mm512_loadu_si512(off + (int64_t)j * a.Kp), o1 = _mm512_loadu_si512(off + (int64_t)j * a.Kp + 16);
    __m512i acc[TB][2];
    for (int i = 0; i < TB; ++i) { acc[i][0] = o0; acc[i][1] = o1; }
    const int8_t* uj = ut + (int64_t)j * g4 * 128;
    const uint8_t* vj = v + (int64_t)j * a.g;
#pragma GCC unroll 16
    for (int s = 0; s < g4; ++s) {
      _mm_prefetch((const char*)(uj + s * 128 + 1024), _MM_HINT_T0);  // 1 KB ahead (the next 32-channel group): U from L2 / L3
      _mm_prefetch((const char*)(uj + s * 128 + 1088), _MM_HINT_T0);
      const __m512i u0 = _mm512_loadu_si512(uj + s * 128), u1 = _mm512_loadu_si512(uj + s * 128 + 64);
      for (int i = 0; i < TB; ++i) {
        int32_t w; std::memcpy(&w, vj + i * a.Cp + 4 * s, 4);
        const __m512i bv = _mm512_set1_epi32(w);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], bv, u0);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], bv, u1);
      }
    }
    for (int i = 0; i < TB; ++i) {
      const int sh = ex[(int64_t)i * J + j];
      const __m128i cnt = _mm_cvtsi32_si128(sh);
      if (WIDE) {
        for (int h = 0; h < 2; ++h)
          for (int q = 0; q < 2; ++q) {
            int64_t* w = wide[i] + h * 16 + q * 8;
            const __m512i z = _mm512_cvtepi32_epi64(q ? _mm512_extracti64x4_epi64(acc[i][h], 1) : _mm512_castsi512_si256(acc[i][h]));
            _mm512_store_si512(w, _mm512_add_epi64(_mm512_load_si512(w), _mm512_sll_epi64(z, cnt)));
          }
      } else {
        const __m512i cv = _mm512_set1_epi32(sh);  // a per-lane shift count: one uop (the xmm-count form takes two)
        tot[i][0] = _mm512_add_epi32(tot[i][0], _mm512_sllv_epi32(acc[i][0], cv));
        tot[i][1] = _mm512_add_epi32(tot[i][1], _mm512_sllv_epi32(acc[i][1], cv));
      }
    }
  }
  const int64_t row = (int64_t)t * a.Kp + kb * 32;
  const __m512i lim = _mm512_set1_epi64(2147483647);
  for (int i = 0; i < TB; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512i z = L32::rshift_away(tot[i][h], a.pre_shift);
      for (int q = 0; q < 2; ++q) {
        __m512i z64;
        if (WIDE)  // the twin's rshift by pre_shift, then its clamp to int32
          z64 = _mm512_min_epi64(_mm512_max_epi64(rshift_away64(_mm512_load_si512(wide[i] + h * 16 + q * 8), a.pre_shift),
                                                  _mm512_sub_epi64(_mm512_setzero_si512(), lim)), lim);
        else
          z64 = _mm512_cvtepi32_epi64(q ? _mm512_extracti64x4_epi64(z, 1) : _mm512_castsi512_si256(z));
        requantize_m(a, row + h * 16 + q * 8, z64, mq + i * mq_tile_stride + kb * 32 + h * 16 + q * 8);
      }
    }
}

template <bool WIDE, int G4>
void gemm_tiles(const StepArgs& a, int t, int64_t kb, int64_t ntiles, const uint8_t* v, const uint8_t* e, int16_t* out,
                int64_t stride) {
  constexpr int TB = WIDE ? 4 : 6;
  int64_t i = 0;
  for (; i + TB <= ntiles; i += TB) gemm_block<TB, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride);
  switch (ntiles - i) {
    case 0: break;
    case 1: gemm_block<1, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride); break;
    case 2: gemm_block<2, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride); break;
    case 3: gemm_block<3, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride); break;
    case 4: gemm_block<4, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride); break;
    default: gemm_block<5, WIDE, G4>(a, t, kb, v + i * a.Cp, e + i * a.J, out + i * stride, stride); break;
  }
}

// Phase C: output transform of one tile's M (int16 [tap][Kp]), shift, bias, NHWC int32 store.
template <int N_, int M_>
void output_tile(const StepArgs& a, int64_t p, const int16_t* mq) {
  constexpr int n = N_, m = M_;
  int64_t b; int ty, tx; tile_origin(a, p, b, ty, tx);
  double aq[m * n];
  for (int i = 0; i < m * n; ++i) aq[i] = a.aq[i];
  const __m512d half = _mm512_set1_pd(a.so ? std::ldexp(1.0, a.so - 1) : 0.0), inv = _mm512_set1_pd(std::ldexp(1.0, -a.so));
  const __m512d sign = _mm512_set1_pd(-0.0);
  for (int64_t k = 0; k < a.K; k += 8) {
    const __mmask8 mask = (__mmask8)(a.K - k >= 8 ? 0xFF : (1u << (a.K - k)) - 1);
    __m512d t2[m][n];
    for (int col = 0; col < n; ++col) {
      __m512d d[n];
      for (int i = 0; i < n; ++i)
        d[i] = _mm512_cvtepi32_pd(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(mq + (int64_t)(i * n + col) * a.Kp + k))));
      for (int r = 0; r < m; ++r) {
        __m512d s = _mm512_setzero_pd();
        for (int i = 0; i < n; ++i)
          if (aq[r * n + i] != 0.0) s = _mm512_fmadd_pd(_mm512_set1_pd(aq[r * n + i]), d[i], s);
        t2[r][col] = s;
      }
    }
    const __m512d bias = _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i*)(a.bias + k)));
    for (int r = 0; r < m; ++r) {
      const int64_t oy = (int64_t)ty * m + r;
      if (oy >= a.OH) break;
      for (int q = 0; q < m; ++q) {
        const int64_t ox = (int64_t)tx * m + q;
        if (ox >= a.OW) break;
        __m512d s = _mm512_setzero_pd();
        for (int col = 0; col < n; ++col)
          if (aq[q * n + col] != 0.0) s = _mm512_fmadd_pd(t2[r][col], _mm512_set1_pd(aq[q * n + col]), s);
        if (a.so) {  // sign(s) floor((|s| + 2^(so-1)) / 2^so): every step exact on integers < 2^53
          const __m512d mag = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_add_pd(_mm512_abs_pd(s), half), inv),
                                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          s = _mm512_or_pd(mag, _mm512_and_pd(s, sign));
        }
        const __m256i out = _mm512_cvtpd_epi32(_mm512_add_pd(s, bias));
        _mm256_mask_storeu_epi32(a.y + ((b * a.OH + oy) * a.OW + ox) * a.K + k, mask, out);
      }
    }
  }
}

template <int N_, int M_>
void run_chunk_t(const StepArgs& a, int64_t p0, int64_t p1) {
  constexpr int T = N_ * N_;
  const int64_t np = p1 - p0;
  thread_local std::vector<uint8_t> v8, ex;
  thread_local std::vector<int16_t> mq;
  v8.resize((size_t)T * np * a.Cp);
  ex.resize((size_t)T * np * a.J);
  mq.resize((size_t)np * T * a.Kp);
  double t0 = g_profile ? thread_seconds() : 0.0;
  if (a.in16) input_phase<L16, N_>(a, p0, p1, v8.data(), ex.data());
  else input_phase<L32, N_>(a, p0, p1, v8.data(), ex.data());
  double t1 = g_profile ? thread_seconds() : 0.0;
  const int64_t stride = (int64_t)T * a.Kp;
  for (int t = 0; t < T; ++t)
    for (int64_t kb = 0; kb < a.Kp / 32; ++kb) {
      const uint8_t* v = v8.data() + (int64_t)t * np * a.Cp;
      const uint8_t* e = ex.data() + (int64_t)t * np * a.J;
      int16_t* out = mq.data() + (int64_t)t * a.Kp;
      if (a.g == 32 && a.wide) gemm_tiles<true, 8>(a, t, kb, np, v, e, out, stride);
      else if (a.g == 32) gemm_tiles<false, 8>(a, t, kb, np, v, e, out, stride);
      else if (a.g == 64 && !a.wide) gemm_tiles<false, 16>(a, t, kb, np, v, e, out, stride);
      else if (a.wide) gemm_tiles<true, 0>(a, t, kb, np, v, e, out, stride);
      else gemm_tiles<false, 0>(a, t, kb, np, v, e, out, stride);
    }
  double t2 = g_profile ? thread_seconds() : 0.0;
  for (int64_t i = 0; i < np; ++i) output_tile<N_, M_>(a, p0 + i, mq.data() + i * T * a.Kp);
  if (g_profile) {  // one thread in profiling runs: plain adds
    const double t3 = thread_seconds();
    g_phase[0] += t1 - t0; g_phase[1] += t2 - t1; g_phase[2] += t3 - t2;
  }
}

void run_chunk(const StepArgs& a, int64_t p0, int64_t p1) {
  switch (a.n) {
    case 4: run_chunk_t<4, 2>(a, p0, p1); break;
    case 6: run_chunk_t<6, 4>(a, p0, p1); break;
    case 8: run_chunk_t<8, 6>(a, p0, p1); break;
    default: TORCH_CHECK(false, "the compiled step runs F(2,3), F(4,3) and F(6,3)");
  }
}

}  // namespace step_vnni
#pragma GCC pop_options

namespace {

// u: (taps, K, C) int8 codes; g: V's channel group. Returns the VNNI packing
// [taps][Kp/32][J][g/4][32][4], -128 sum U per [taps][J][Kp], and U zero-padded to (taps, K, Cp).
std::vector<torch::Tensor> pack(torch::Tensor u, int64_t g) {
  TORCH_CHECK(u.dtype() == torch::kInt8 && u.dim() == 3, "pack: U as (taps, K, C) int8");
  TORCH_CHECK(g > 0 && g % 4 == 0, "pack: the V group must be a multiple of 4 channels");
  u = u.contiguous();
  const int64_t T = u.size(0), K = u.size(1), C = u.size(2), J = (C + g - 1) / g, Cp = J * g, Kp = (K + 31) / 32 * 32;
  auto up = torch::zeros({T, Kp / 32, J, g / 4, 32, 4}, torch::kInt8);
  auto uoff = torch::zeros({T, J, Kp}, torch::kInt32);
  auto upad = torch::zeros({T, K, Cp}, torch::kInt8);
  const int8_t* s = u.data_ptr<int8_t>();
  int8_t* d = up.data_ptr<int8_t>();
  int8_t* q = upad.data_ptr<int8_t>();
  int32_t* o = uoff.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) {
        const int8_t val = s[(t * K + k) * C + c];
        const int64_t j = c / g, cc = c % g;
        d[((((t * (Kp / 32) + k / 32) * J + j) * (g / 4) + cc / 4) * 32 + k % 32) * 4 + cc % 4] = val;
        o[(t * J + j) * Kp + k] -= 128 * (int32_t)val;
        q[(t * K + k) * Cp + c] = val;
      }
  return {up, uoff, upad};
}

// x: (N, C, H, W) int8 or int32 codes (any strides); geom: m, n, pad_top, pad_left, OH, OW;
// v: g, v_range, v_bits; shifts: sb, in16, pre_shift, so, wide; mtab: (taps, Kp) int64 mb, mc, half.
torch::Tensor forward(torch::Tensor x, std::vector<int64_t> geom, torch::Tensor bq, std::vector<int64_t> v,
                      std::vector<int64_t> shifts, torch::Tensor up, torch::Tensor uoff, torch::Tensor upad,
                      torch::Tensor mb, torch::Tensor mc, torch::Tensor mhalf, int64_t m_range, torch::Tensor aq,
                      torch::Tensor bias, std::string isa, int64_t chunk) {
  TORCH_CHECK(x.dim() == 4 && (x.dtype() == torch::kInt8 || x.dtype() == torch::kInt32), "x: (N, C, H, W) int8 or int32 codes");
  StepArgs a{};
  a.m = (int)geom[0]; a.n = (int)geom[1];
  const int pt = (int)geom[2], pl = (int)geom[3];
  a.OH = geom[4]; a.OW = geom[5];
  a.th = (int)((a.OH + a.m - 1) / a.m); a.tw = (int)((a.OW + a.m - 1) / a.m);
  a.N = x.size(0);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  a.g = (int)v[0]; a.v_range = (int)v[1]; a.v_bits = (int)v[2];
  a.J = (int)((C + a.g - 1) / a.g); a.Cp = (int64_t)a.J * a.g;
  a.Hp = (int64_t)a.th * a.m + a.n - a.m; a.Wp = (int64_t)a.tw * a.m + a.n - a.m;
  a.P = a.N * a.th * a.tw;
  a.sb = (int)shifts[0]; a.in16 = (int)shifts[1]; a.pre_shift = (int)shifts[2]; a.so = (int)shifts[3]; a.wide = (int)shifts[4];
  TORCH_CHECK(!a.in16 || a.sb == 0, "int16 lanes take no first-pass shift");
  a.K = upad.size(1); a.Kp = uoff.size(2);
  TORCH_CHECK(upad.size(0) == a.n * a.n && upad.size(2) == a.Cp, "U does not match the layer");
  auto bqc = bq.to(torch::kInt32).contiguous();
  TORCH_CHECK(aq.dtype() == torch::kInt64 && aq.numel() == a.m * a.n, "aq: (m, n) int64");
  // the output rows as float64 lanes hold them: exact integers (|entry| < 2^53, and every product and
  // sum the transform forms stays below 2^53: checked by the caller)
  auto aqi = aq.contiguous();
  std::vector<double> aqd(a.m * a.n);
  for (int i = 0; i < a.m * a.n; ++i) aqd[i] = (double)aqi.data_ptr<int64_t>()[i];
  auto mbc = mb.to(torch::kInt64).contiguous(), mcc = mc.to(torch::kInt64).contiguous(), mhc = mhalf.to(torch::kInt64).contiguous();
  auto bc = bias.to(torch::kInt32).contiguous();
  TORCH_CHECK(mbc.numel() == a.n * a.n * a.Kp && bc.numel() == a.Kp, "M multipliers / bias: (taps, Kp) / (Kp,)");
  a.bq = bqc.data_ptr<int32_t>(); a.aq = aqd.data();
  a.up = up.data_ptr<int8_t>(); a.uoff = uoff.data_ptr<int32_t>(); a.u = upad.data_ptr<int8_t>();
  a.mb = mbc.data_ptr<int64_t>(); a.mc = mcc.data_ptr<int64_t>(); a.mhalf = mhc.data_ptr<int64_t>();
  a.m_range = (int)m_range; a.bias = bc.data_ptr<int32_t>();
  // zero-padded NHWC int8 copy of the codes (the tiles overhang the map by up to m - 1 pixels)
  auto xp = torch::zeros({a.N, a.Hp, a.Wp, a.Cp}, torch::kInt8);
  int8_t* xpd = xp.data_ptr<int8_t>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool i8 = x.dtype() == torch::kInt8;
  const int8_t* x8 = i8 ? x.data_ptr<int8_t>() : nullptr;
  const int32_t* x32 = i8 ? nullptr : x.data_ptr<int32_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, a.N * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      if (h + pt >= a.Hp) continue;
      for (int64_t w = 0; w < W && w + pl < a.Wp; ++w) {
        int8_t* dst = xpd + ((b * a.Hp + h + pt) * a.Wp + w + pl) * a.Cp;
        const int64_t src = b * sN + h * sH + w * sW;
        if (i8 && sC == 1) std::memcpy(dst, x8 + src, C);
        else if (i8) for (int64_t c = 0; c < C; ++c) dst[c] = x8[src + c * sC];
        else
          for (int64_t c = 0; c < C; ++c) {
            const int32_t val = x32[src + c * sC];
            if (val < -128 || val > 127) out_of_range = true;
            dst[c] = (int8_t)val;
          }
      }
    }
  });
  TORCH_CHECK(!out_of_range, "the integer Winograd step takes 8-bit input codes; got a code outside [-128, 127]");
  a.xp = xpd;
  auto y = torch::empty({a.N, a.K, a.OH, a.OW}, torch::TensorOptions().dtype(torch::kInt32).memory_format(at::MemoryFormat::ChannelsLast));
  a.y = y.data_ptr<int32_t>();
  isa = winoq_isa::checked(isa);
  // tiles per chunk: each chunk streams all of U once, so long chunks reuse it (SD-1.5 640 channels: 12
  // tiles 1.14x oneDNN int8, 24-42 tiles 1.5x); V of about 1 MB per chunk stays in L2; 24-48 tiles, and
  // no longer than gives every thread a chunk
  if (chunk > 0) a.chunk = chunk;
  else {
    const int64_t by_cache = std::max<int64_t>(24, std::min<int64_t>(48, ((int64_t)1 << 20) / (a.n * a.n * a.Cp) / 6 * 6));
    const int64_t threads = at::get_num_threads();
    a.chunk = std::max<int64_t>(6, std::min(by_cache, (a.P + threads - 1) / threads));
  }
  const int64_t nchunks = (a.P + a.chunk - 1) / a.chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = c * a.chunk, p1 = std::min(a.P, p0 + a.chunk);
      if (isa == "avx512-vnni") step_vnni::run_chunk(a, p0, p1);
      else if (isa == "avx2") step_avx2::run_chunk(a, p0, p1);
      else step_portable::run_chunk(a, p0, p1);
    }
  });
  return y;
}

}  // namespace

std::vector<double> profile() {  // ms per phase (input, GEMM, output) since the last call
  std::vector<double> r{g_phase[0] * 1e3, g_phase[1] * 1e3, g_phase[2] * 1e3};
  g_phase[0] = g_phase[1] = g_phase[2] = 0;
  return r;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("profile", &profile, "per-phase thread ms since the last call (WINOQ_KERNEL_PROFILE=1)");
  mod.def("pack", &pack, "pack int8 U codes of the integer Winograd step");
  mod.def("forward", &forward, "integer Winograd step (V in block floating point)");
  mod.def("best_isa", &winoq_isa::best, "instruction set the step picks on this CPU");
}
