// The direct conv and the requantization steps of winoq's integer-only graphs, compiled for CPUs.
//
// conv: winoq.integer.layers.IntConv2d.forward (int32 accumulator conv(x, W) + bias), bit for bit,
// as an int8 implicit GEMM. The input codes are copied once, + 128 as u8, into zero-padded planes
// [image][C/4][position][4] (position = row * Wp + column of the padded map; code 0 = 128 in the
// padding and the channels past C). Output pixel (oy, ox)'s window starts at position oy sh Wp + ox sw
// + tap offset: a block of output pixels (consecutive in the output, across rows) keeps each one's
// offset, and at every (tap, channel quad) step reads its dword at step offset + pixel offset. The
// weights are packed once as [K/16][step][16][4]; per block of output pixels x 16-64 output channels
// the sums over taps and channels run with VNNI vpdpbusd,
// started at bias - 128 sum(W) (which removes the u8 offset). Every sum is exact modulo 2^32 and
// the converter keeps these convs' results inside int32, so the int32 result is exact.
//
// Inputs with few channels (C not a multiple of 4, e.g. the 3-channel image) would waste the quads'
// missing bytes on every tap. When it saves steps, the VNNI build uses the packed-rows layout instead:
// one zero-padded channels-last image [row][column][C] (+ 128), whose window rows are runs of kw C
// consecutive bytes, read as ceil(kw C / 4) dwords per row (7 x 7 x 3: 42 steps instead of 49 x 1;
// the bytes past a window row's end meet zero weights).
//
// epilogue (fused into the conv, or on its own): the accumulator out as int32, or requantized to the
// next value's int8 codes, clamp((z b + 2^(c-1)) >> c) (winoq.integer.layers.Requantize), or a
// residual add of two requantized values, clamp(rq(z) + rq(other)) (IntAdd), in int64 lanes: with
// |z| <= 2^31 and b < 2^31 nothing leaves int64.
//
// The instruction set is picked at run time: AVX-512 VNNI, or portable C++ (also compiled for AVX2).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "cpu_isa.h"

namespace {

struct Epi {
  int mode;                          // 0: int32 out; 1: requantize to int8 codes; 2: requantize + add other;
                                     // 3: float z * fs[k], NCHW (a conv with float output)
  const int64_t *b, *c, *half;       // [Kp] the main input's dyadic multiplier, shift, 2^(c-1)
  const void* other; int other32;    // mode 2: NHWC int8 codes or int32 accumulator, K channels
  const int64_t *ob, *oc, *ohalf;    // [Kp] the other input's multiplier
  int64_t qmin, qmax;
  const float* fs;                   // mode 3: [K] the accumulator's scale per channel
  void* y;                           // NHWC out, K channels: int32 (mode 0) or int8; mode 3: NCHW float
  int64_t K, hw;                     // hw: output pixels per image
};

struct ConvArgs {
  const uint8_t* xp; int64_t Hp, Wp, Cq, plane;  // planes [N][Cq/4][plane][4] of codes + 128 (see above)
  bool packed;                                   // xp in the packed-rows layout (see above), not planes
  int64_t image_bytes, row_bytes, pixel_bytes;   // per image, padded row and pixel of xp (either layout)
  int kh, kw, sh, sw, dh, dw; int64_t OH, OW;
  const int64_t* toff;                     // [taps] position offset of each tap
  const int64_t* soff;                     // [steps] byte offset of each (tap, channel quad) step
  int64_t steps;                           // taps * Cq/4 rounded up to 4 (the extra steps: zero weights)
  const int8_t* wp; const int32_t* w0;     // packed weights [Kp/16][steps][16][4]; bias - 128 sum W [Kp]
  const int8_t* wq;                        // (K, taps, Cq) codes (portable path)
  const int32_t* bias;                     // [K]
  int64_t K, Kp, rows;                     // rows: output rows per parallel job
  Epi e;
};

inline const uint8_t* image_planes(const ConvArgs& a, int64_t b) { return a.xp + b * a.image_bytes; }

// the packed-rows layout (see above) for a conv of C input channels, kernel width kw, dilation dw: when
// a window row's ceil(kw C / 4) dwords are fewer than its kw ceil(C / 4) quads
inline bool packed_rows(int64_t C, int64_t kw, int64_t dw) {
  return C % 4 != 0 && dw == 1 && (kw * C + 3) / 4 < kw * ((C + 3) / 4);
}

// the dwords of one window row in the packed-rows layout (step ky * row_quads + q: bytes 4q .. of row ky)
inline int64_t row_quads(int64_t C, int64_t kw) { return (kw * C + 3) / 4; }

// the (tap, channel quad) steps of a packed weight, rounded up to 4 with zero weights so that the GEMM
// loop always runs unrolled; what pack() lays out and conv() checks
inline int64_t packed_steps(int64_t C, int64_t kh, int64_t kw, int64_t dw) {
  return ((packed_rows(C, kw, dw) ? kh * row_quads(C, kw) : kh * kw * ((C + 3) / 4)) + 3) / 4 * 4;
}

// n int8 codes + 128 as u8 (a flip of the sign bit); restrict and locals: byte stores through a
// captured pointer would make the compiler reload every captured value per byte
inline void flip_copy(uint8_t* __restrict dst, const int8_t* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = (uint8_t)src[i] ^ 0x80;
}

// the codes of one pixel (channels-last int8, n a multiple of 4) + 128, a dword per plane
inline void offset_copy_quads(uint8_t* dst, const int8_t* src, int64_t n, int64_t plane_bytes) {
  for (int64_t s = 0; s < n / 4; ++s) {
    uint32_t v; std::memcpy(&v, src + 4 * s, 4);
    v ^= 0x80808080u;
    std::memcpy(dst + s * plane_bytes, &v, 4);
  }
}

// mode 3 on np pixels p0 .. of one image: float(z) fs[k] (one rounding, as torch's z.float() * fs),
// each channel's run of pixels written contiguously into the NCHW output
inline void epilogue_float(const Epi& e, int64_t p0, int64_t np, const int32_t* z, int64_t ldz) {
  float* y = (float*)e.y + (p0 / e.hw) * e.K * e.hw + p0 % e.hw;
  for (int64_t k = 0; k < e.K; ++k) {
    const float s = e.fs[k];
    float* yk = y + k * e.hw;
    for (int64_t i = 0; i < np; ++i) yk[i] = (float)z[i * ldz + k] * s;
  }
}

// codes of a float input: clamp(round_half_even(v * inv), -128, 127) + 128, as the PyTorch definition
// (clamping first also sends infinities to the ends). Adding and subtracting 1.5 * 2^23 rounds a
// float below 2^22 in magnitude to the nearest integer, ties to even, without a library call.
inline uint8_t float_code(float v, float inv) {
  volatile float big = 12582912.0f;  // volatile: no compiler may fold (c + big) - big into c
  const float r = (std::min(std::max(v * inv, -128.0f), 127.0f) + big) - big;
  return (uint8_t)((int)r + 128);
}

// one pixel's C codes (channels-last int8) + 128, a dword per plane, the last quad padded with code 0
inline void offset_copy_pixel(uint8_t* dst, const int8_t* src, int64_t C, int64_t plane_bytes) {
  offset_copy_quads(dst, src, C / 4 * 4, plane_bytes);
  if (C % 4 == 0) return;
  uint32_t v = 0;  // built in a register (bytes copied into a stacked dword would stall its load)
  for (int64_t i = 0; i < C % 4; ++i) v |= (uint32_t)(uint8_t)src[C / 4 * 4 + i] << (8 * i);
  v ^= 0x80808080u;
  std::memcpy(dst + (C / 4) * plane_bytes, &v, 4);
}

inline void epilogue_one(const Epi& e, int64_t p, int64_t k, int64_t z) {
  const int64_t i = p * e.K + k;
  if (e.mode == 0) { ((int32_t*)e.y)[i] = (int32_t)z; return; }
  int64_t v = (z * e.b[k] + e.half[k]) >> e.c[k];
  if (e.mode == 2) {
    const int64_t o = e.other32 ? ((const int32_t*)e.other)[i] : ((const int8_t*)e.other)[i];
    v += (o * e.ob[k] + e.ohalf[k]) >> e.oc[k];
  }
  ((int8_t*)e.y)[i] = (int8_t)std::min(std::max(v, e.qmin), e.qmax);
}

}  // namespace

namespace graph_portable {
#include "int_graph_portable.h"
}  // namespace graph_portable

#pragma GCC push_options
#pragma GCC target("avx2")
namespace graph_avx2 {
#include "int_graph_portable.h"
}  // namespace graph_avx2
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------ AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace graph_vnni {

// 8 channels of one value: rq(z) = (z b + 2^(c-1)) >> c in int64 lanes (mul_epi32: the low 32
// bits of each lane, signed)
inline __m512i rq8(__m512i z, __m512i b, __m512i half, __m512i c) {
  return _mm512_srav_epi64(_mm512_add_epi64(_mm512_mul_epi32(z, b), half), c);
}

inline __m512i load8(const void* p, int is32, __mmask8 m) {  // 8 int8 or int32 values as int64 lanes
  return is32 ? _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(m, (const int32_t*)p))
              : _mm512_cvtepi8_epi64(_mm_maskz_loadu_epi8((__mmask16)m, (const int8_t*)p));
}

struct Tabs8 {  // one 8-channel group's tables, loaded once for all pixels
  __m512i b, half, c;
  Tabs8(const int64_t* pb, const int64_t* ph, const int64_t* pc, int64_t k, __mmask8 m)
      : b(_mm512_maskz_loadu_epi64(m, pb + k)), half(_mm512_maskz_loadu_epi64(m, ph + k)), c(_mm512_maskz_loadu_epi64(m, pc + k)) {}
};

// r[i][c] -> r[c][i] for a 16 x 16 float tile: unpack pairs of rows, then pairs of pairs, then
// 128-bit lanes twice
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// mode 3 on np pixels p0 .. of one image (rows ldz apart in z): tiles of 16 pixels x 16 channels,
// converted and scaled per pixel, transposed, and stored as 16 runs of pixels, one per channel row of
// the NCHW output
void epilogue_float_tiles(const Epi& e, int64_t p0, int64_t np, const int32_t* z, int64_t ldz) {
  float* y = (float*)e.y + (p0 / e.hw) * e.K * e.hw + p0 % e.hw;
  for (int64_t k = 0; k < e.K; k += 16) {
    const int64_t kn = std::min<int64_t>(16, e.K - k);
    const __mmask16 mk = (__mmask16)((1u << kn) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mk, e.fs + k);
    for (int64_t j0 = 0; j0 < np; j0 += 16) {
      const int64_t pn = std::min<int64_t>(16, np - j0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)  // cvtepi32_ps rounds to nearest, as torch's int -> float
        r[i] = i < pn ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mk, z + (j0 + i) * ldz + k)), s)
                      : _mm512_setzero_ps();
      transpose16(r);
      const __mmask16 mp = (__mmask16)((1u << pn) - 1);
      for (int64_t c = 0; c < kn; ++c) _mm512_mask_storeu_ps(y + (k + c) * e.hw + j0, mp, r[c]);
    }
  }
}

// 16-channel groups outer, pixels inner (the group's tables stay in registers); each pixel's 16
// codes leave in one store
void epilogue(const Epi& e, int64_t p0, int64_t np, const void* z, int z32, int64_t ldz) {
  if (e.mode == 3) { epilogue_float_tiles(e, p0, np, (const int32_t*)z, ldz); return; }  // z: the conv's int32 block
  if (e.mode == 0) {  // the accumulator as it is (the conv's int32 block)
    for (int64_t i = 0; i < np; ++i)
      if (z32) std::memcpy((int32_t*)e.y + (p0 + i) * e.K, (const int32_t*)z + i * ldz, e.K * 4);
      else for (int64_t k = 0; k < e.K; ++k) ((int32_t*)e.y)[(p0 + i) * e.K + k] = ((const int8_t*)z)[i * ldz + k];
    return;
  }
  const __m512i lo = _mm512_set1_epi64(e.qmin), hi = _mm512_set1_epi64(e.qmax);
  const int zb = z32 ? 4 : 1, ob = e.other32 ? 4 : 1;
  for (int64_t k = 0; k < e.K; k += 16) {
    const int64_t left = e.K - k;
    const __mmask8 m0 = (__mmask8)(left >= 8 ? 0xFF : (1u << left) - 1);
    const __mmask8 m1 = (__mmask8)(left >= 16 ? 0xFF : left <= 8 ? 0 : (1u << (left - 8)) - 1);
    const __mmask16 m16 = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const Tabs8 t0(e.b, e.half, e.c, k, m0), t1(e.b, e.half, e.c, k + 8, m1);
    const Tabs8 o0 = e.mode == 2 ? Tabs8(e.ob, e.ohalf, e.oc, k, m0) : t0;
    const Tabs8 o1 = e.mode == 2 ? Tabs8(e.ob, e.ohalf, e.oc, k + 8, m1) : t1;
    for (int64_t i = 0; i < np; ++i) {
      const int64_t at = (p0 + i) * e.K + k;
      const char* zi = (const char*)z + (i * ldz + k) * zb;
      __m512i v0 = rq8(load8(zi, z32, m0), t0.b, t0.half, t0.c);
      __m512i v1 = rq8(load8(zi + 8 * zb, z32, m1), t1.b, t1.half, t1.c);
      if (e.mode == 2) {
        const char* oi = (const char*)e.other + at * ob;
        v0 = _mm512_add_epi64(v0, rq8(load8(oi, e.other32, m0), o0.b, o0.half, o0.c));
        v1 = _mm512_add_epi64(v1, rq8(load8(oi + 8 * ob, e.other32, m1), o1.b, o1.half, o1.c));
      }
      v0 = _mm512_min_epi64(_mm512_max_epi64(v0, lo), hi);
      v1 = _mm512_min_epi64(_mm512_max_epi64(v1, lo), hi);
      const __m128i codes = _mm_unpacklo_epi64(_mm512_cvtepi64_epi8(v0), _mm512_cvtepi64_epi8(v1));
      _mm_mask_storeu_epi8((int8_t*)e.y + at, m16, codes);
    }
  }
}

// the codes of n pixels (channels-last int8 rows, C a multiple of 4, pixel stride C) + 128 into
// the planes: 16 pixels' dwords of a channel quad per gather
void copy_quads(uint8_t* dst, const int8_t* src, int64_t n, int64_t C, int64_t plane_bytes) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32((int)C));
  const __m512i flip = _mm512_set1_epi32((int)0x80808080u);
  int64_t w = 0;
  for (; w + 16 <= n; w += 16)
    for (int64_t s = 0; s < C / 4; ++s) {
      const __m512i v = _mm512_i32gather_epi32(idx, (const void*)(src + w * C + 4 * s), 1);
      _mm512_storeu_si512(dst + s * plane_bytes + w * 4, _mm512_xor_si512(v, flip));
    }
  for (; w < n; ++w)
    for (int64_t s = 0; s < C / 4; ++s) {
      uint32_t v; std::memcpy(&v, src + w * C + 4 * s, 4);
      v ^= 0x80808080u;
      std::memcpy(dst + s * plane_bytes + w * 4, &v, 4);
    }
}

// float input: the codes of one channel's row of n pixels (src; nullptr: a channel past C, code 0) into
// byte j of each of the plane's n dwords, 16 pixels per step, the last step masked (each code as in
// float_code)
void quantize_row_byte(uint8_t* dst, const float* src, int j, int64_t n, float inv) {
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i off = _mm512_set1_epi32(128);
  const __m128i shift = _mm_cvtsi32_si128(8 * j);
  const uint64_t bytes = 0x1111111111111111ull << j;  // byte j of every dword
  for (int64_t w = 0; w < n; w += 16) {
    const int64_t left = std::min<int64_t>(16, n - w);
    __m512i v = off;
    if (src) {
      const __m512 f = _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), src + w);
      const __m512 c = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(f, vinv), lo), hi);
      v = _mm512_add_epi32(_mm512_cvtps_epi32(c), off);  // cvtps: round half even; + 128: 0 .. 255
    }
    const uint64_t m = left == 16 ? bytes : bytes & ((1ull << (4 * left)) - 1);
    _mm512_mask_storeu_epi8(dst + w * 4, (__mmask64)m, _mm512_sll_epi32(v, shift));
  }
}

// One block of TB output pixels, pixel i's window at byte offset poff[i] of the image's planes, x NB
// blocks of 16 output channels from block kb: int32 sums into out (rows ldo apart). One loop over
// (tap, channel quad) steps, their input offsets precomputed (soff), the weights read in order.
// Per-pixel offsets let a block run across output rows and strides without computing the columns
// of the padding (a 7-wide map has 9 columns with its padding).
template <int TB, int NB, int U>
inline void conv_block(const ConvArgs& a, const uint8_t* img, const int64_t* poff, int64_t kb, int32_t* out,
                       int64_t ldo) {
  const int64_t steps = a.steps;
  __m512i acc[TB][NB];
  const int8_t* w[NB];
  int64_t po[TB];
  for (int i = 0; i < TB; ++i) po[i] = poff[i];
  for (int nb = 0; nb < NB; ++nb) {
    const __m512i w0 = _mm512_loadu_si512(a.w0 + (kb + nb) * 16);
    for (int i = 0; i < TB; ++i) acc[i][nb] = w0;
    w[nb] = a.wp + (kb + nb) * steps * 64;
  }
#define WINOQ_CONV_STEP(S)                                                                   \
  {                                                                                            \
    __m512i wv[NB];                                                                            \
    for (int nb = 0; nb < NB; ++nb) wv[nb] = _mm512_loadu_si512(w[nb] + (S) * 64);            \
    const uint8_t* as = img + a.soff[S];                                                       \
    for (int i = 0; i < TB; ++i) {                                                             \
      int32_t v; std::memcpy(&v, as + po[i], 4);                                               \
      const __m512i bv = _mm512_set1_epi32(v);                                                 \
      for (int nb = 0; nb < NB; ++nb) acc[i][nb] = _mm512_dpbusd_epi32(acc[i][nb], bv, wv[nb]); \
    }                                                                                          \
  }
  // U steps per iteration, U dividing the steps: no remainder loop (its phis make GCC copy the
  // accumulators), and the accumulators' spills at the loop's back edge paid once per U steps
  for (int64_t s = 0; s < steps; s += U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) WINOQ_CONV_STEP(s + u)
  }
#undef WINOQ_CONV_STEP
  for (int i = 0; i < TB; ++i)
    for (int nb = 0; nb < NB; ++nb) _mm512_storeu_si512(out + i * ldo + (kb + nb) * 16, acc[i][nb]);
}

// Output rows oy0 .. oy1 of image b: their OW-wide rows as one run of pixels, in blocks of TB (the
// last block padded with the last pixel); each block of output channels over all blocks (its weights
// stay in cache), then the epilogue on the whole run.
template <int TB, int NB>
void conv_rows_t(const ConvArgs& a, int64_t b, int64_t oy0, int64_t oy1) {
  const int64_t np = (oy1 - oy0) * a.OW, nblk = (np + TB - 1) / TB;
  const uint8_t* img = image_planes(a, b);
  const int64_t steps = a.steps;  // a multiple of 4
  const auto block = steps % 16 == 0 ? conv_block<TB, NB, 16> : steps % 8 == 0 ? conv_block<TB, NB, 8>
                   : conv_block<TB, NB, 4>;
  thread_local std::vector<int32_t> buf;
  thread_local std::vector<int64_t> poff;
  buf.resize((size_t)nblk * TB * a.Kp);
  poff.resize((size_t)nblk * TB);
  for (int64_t j = 0; j < nblk * TB; ++j) {
    const int64_t p = std::min(j, np - 1), oy = oy0 + p / a.OW, ox = p % a.OW;
    poff[j] = oy * a.sh * a.row_bytes + ox * a.sw * a.pixel_bytes;
  }
  for (int64_t kb = 0; kb < a.Kp / 16; kb += NB)
    for (int64_t blk = 0; blk < nblk; ++blk)
      block(a, img, poff.data() + blk * TB, kb, buf.data() + blk * TB * a.Kp, a.Kp);
  epilogue(a.e, (b * a.OH + oy0) * a.OW, np, buf.data(), 1, a.Kp);
}

void conv_rows(const ConvArgs& a, int64_t b, int64_t oy0, int64_t oy1) {
  const int64_t blocks = a.Kp / 16;
  if (blocks % 4 == 0) conv_rows_t<6, 4>(a, b, oy0, oy1);
  else if (blocks % 2 == 0) conv_rows_t<12, 2>(a, b, oy0, oy1);
  else conv_rows_t<16, 1>(a, b, oy0, oy1);
}

// An integer model's input quantization (quantize_input's definition): the codes
// clamp(round_half_even(double(x) / scale), -lim, lim) of 8 values. The quotient is taken as
// x * (1 / scale), within 2^-52 of x / scale relative; when a value (clamped: at most 127) lies within
// 2^-40 of a half-integer, where that could change the rounding, the 8 are redone with the division.
struct InputCodes {
  __m512d inv, s, lo, hi, half, tol, magnitude;
  InputCodes(double scale, double lim)
      : inv(_mm512_set1_pd(1.0 / scale)), s(_mm512_set1_pd(scale)), lo(_mm512_set1_pd(-lim)), hi(_mm512_set1_pd(lim)),
        half(_mm512_set1_pd(0.5)), tol(_mm512_set1_pd(std::ldexp(1.0, -40))),
        magnitude(_mm512_castsi512_pd(_mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll))) {}
  __m256i operator()(__m256 xf) const {
    const __m512d x = _mm512_cvtps_pd(xf);
    __m512d v = _mm512_min_pd(_mm512_max_pd(_mm512_mul_pd(x, inv), lo), hi);
    const __m512d frac = _mm512_sub_pd(v, _mm512_roundscale_pd(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    if (_mm512_cmp_pd_mask(_mm512_and_pd(_mm512_sub_pd(frac, half), magnitude), tol, _CMP_LT_OQ))
      v = _mm512_min_pd(_mm512_max_pd(_mm512_div_pd(x, s), lo), hi);
    return _mm512_cvtpd_epi32(_mm512_roundscale_pd(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// one image row's codes in channels-last order, out[w C + c], from channel rows x[c sC + w] (offsets
// below 2^31): 16 codes per step, their floats gathered. Output bytes j and j + 16 C are the same
// channel 16 pixels apart, so C offset vectors serve the whole row: bp[j] = (j % C) sC + j / C for
// j < 16 C (gather_offsets, made once per call).
void quantize_row_gather(const float* x, const int32_t* bp, int64_t C, int64_t W, const InputCodes& q, int8_t* out) {
  const __m512i step = _mm512_set1_epi32(16);
  const int64_t n = C * W;
  for (int64_t j0 = 0; j0 < n; j0 += 16 * C) {
    const __m512i shift = _mm512_mullo_epi32(step, _mm512_set1_epi32((int32_t)(j0 / (16 * C))));
    for (int64_t i = 0; i < C && j0 + 16 * i < n; ++i) {
      const int64_t j = j0 + 16 * i, left = std::min<int64_t>(16, n - j);
      const __mmask16 m = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
      const __m512i idx = _mm512_add_epi32(_mm512_loadu_si512(bp + 16 * i), shift);
      const __m512 f = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
      const __m256i a = q(_mm512_castps512_ps256(f)), b = q(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
      const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm_mask_storeu_epi8(out + j, m, _mm512_cvtepi32_epi8(codes));
    }
  }
}

std::vector<int32_t> gather_offsets(int64_t C, int64_t sC) {
  std::vector<int32_t> bp((size_t)C * 16);
  for (int64_t j = 0; j < 16 * C; ++j) bp[j] = (int32_t)((j % C) * sC + j / C);
  return bp;
}

// max pool, one output row: out[ox][c] = max over the window's positions inside the image of x[y][x][c]
// (channels-last int8 rows of C bytes; the positions outside count as -128, which never wins), 64
// channels per instruction
void max_pool_row(const int8_t* x, int8_t* out, int64_t C, int64_t H, int64_t W, int64_t OW, int64_t y0, int64_t y1,
                  int64_t kw, int64_t sw, int64_t pw) {
  for (int64_t ox = 0; ox < OW; ++ox) {
    const int64_t x0 = std::max<int64_t>(0, ox * sw - pw), x1 = std::min<int64_t>(W, ox * sw - pw + kw);
    for (int64_t c = 0; c < C; c += 64) {
      const __mmask64 m = C - c >= 64 ? ~0ull : (1ull << (C - c)) - 1;
      __m512i v = _mm512_set1_epi8(-128);
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t xx = x0; xx < x1; ++xx) v = _mm512_max_epi8(v, _mm512_maskz_loadu_epi8(m, x + (y * W + xx) * C + c));
      _mm512_mask_storeu_epi8(out + ox * C + c, m, v);
    }
  }
}

}  // namespace graph_vnni
#pragma GCC pop_options

namespace {

// w: (K, C, kh, kw) integer weight codes in [-128, 127]; dw: the conv's column dilation. Returns the VNNI
// packing [Kp/16][steps][16][4] (step = tap * Cq/4 + channel quad, or in the packed-rows layout window
// row * ceil(kw C / 4) + dword; steps rounded up to 4 with zero weights, so that the GEMM loop always
// runs unrolled),
// the codes as (K, taps, Cq), and bias - 128 sum(W) per [Kp].
std::vector<torch::Tensor> pack(torch::Tensor w, torch::Tensor bias, int64_t dw) {
  TORCH_CHECK(w.dim() == 4, "pack: weight as (K, C, kh, kw)");
  auto wl = w.to(torch::kInt64).contiguous();
  auto bl = bias.to(torch::kInt64).contiguous();
  const int64_t K = w.size(0), C = w.size(1), kw = w.size(3), taps = w.size(2) * kw;
  const int64_t Cq = (C + 3) / 4 * 4, Kp = (K + 15) / 16 * 16;
  TORCH_CHECK(bl.numel() == K, "pack: one bias per output channel");
  const bool rows = packed_rows(C, kw, dw);
  const int64_t rq = row_quads(C, kw), steps = packed_steps(C, w.size(2), kw, dw);
  auto wp = torch::zeros({Kp / 16, steps, 16, 4}, torch::kInt8);
  auto wq = torch::zeros({K, taps, Cq}, torch::kInt8);
  auto w0 = torch::zeros({Kp}, torch::kInt32);
  const int64_t* s = wl.data_ptr<int64_t>();
  int8_t* d = wp.data_ptr<int8_t>();
  int8_t* q = wq.data_ptr<int8_t>();
  int32_t* o = w0.data_ptr<int32_t>();
  for (int64_t k = 0; k < K; ++k) {
    int64_t off = bl.data_ptr<int64_t>()[k];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t v = s[(k * C + c) * taps + t];
        TORCH_CHECK(v >= -128 && v <= 127, "pack: weight codes must fit int8, got ", v);
        const int64_t f = (t % kw) * C + c;  // the byte of its window row (packed rows)
        const int64_t step = rows ? (t / kw) * rq + f / 4 : t * (Cq / 4) + c / 4, byte = rows ? f % 4 : c % 4;
        d[(((k / 16) * steps + step) * 16 + k % 16) * 4 + byte] = (int8_t)v;
        q[(k * taps + t) * Cq + c] = (int8_t)v;
        off -= 128 * v;
      }
    o[k] = (int32_t)off;  // modulo 2^32, as the sums are
  }
  return {wp, wq, w0};
}

// The epilogue's tables: tabs = [b, c, half] (and [ob, oc, ohalf] in mode 2), each (Kp,) int64.
Epi make_epi(int64_t mode, const std::vector<torch::Tensor>& tabs, torch::Tensor other, int64_t qmin, int64_t qmax,
             int64_t K, int64_t P) {
  Epi e{};
  e.mode = (int)mode; e.K = K; e.qmin = qmin; e.qmax = qmax;
  TORCH_CHECK(mode >= 0 && mode <= 3, "epilogue mode must be 0, 1, 2 or 3");
  if (mode == 3) {
    TORCH_CHECK(tabs.size() == 1 && tabs[0].dtype() == torch::kFloat && tabs[0].is_contiguous() && tabs[0].numel() >= K,
                "float epilogue: one float32 scale per output channel");
    e.fs = tabs[0].data_ptr<float>();
    return e;
  }
  TORCH_CHECK(tabs.size() == (mode == 0 ? 0u : mode == 1 ? 3u : 6u), "epilogue: 3 tables per requantized input");
  for (auto& t : tabs) TORCH_CHECK(t.dtype() == torch::kInt64 && t.is_contiguous() && t.numel() >= K, "epilogue tables: int64 (Kp,)");
  if (mode >= 1) { e.b = tabs[0].data_ptr<int64_t>(); e.c = tabs[1].data_ptr<int64_t>(); e.half = tabs[2].data_ptr<int64_t>(); }
  if (mode == 2) {
    e.ob = tabs[3].data_ptr<int64_t>(); e.oc = tabs[4].data_ptr<int64_t>(); e.ohalf = tabs[5].data_ptr<int64_t>();
    TORCH_CHECK(other.dtype() == torch::kInt8 || other.dtype() == torch::kInt32, "the added value: int8 codes or int32");
    TORCH_CHECK(other.is_contiguous(at::MemoryFormat::ChannelsLast) && other.numel() == P * K,
                "the added value: channels-last, the output's shape");
    e.other = other.data_ptr(); e.other32 = other.dtype() == torch::kInt32;
  }
  return e;
}

// The input's codes + 128 in the planes of ConvArgs (the calling thread's buffer, kept between calls: a
// fresh allocation of this size would be mapped and page-faulted in on every call). x: int8 / int32
// codes or float32 values quantized on the way (finv), any strides.
uint8_t* input_planes(const torch::Tensor& x, const ConvArgs& a, int64_t ph, int64_t pw, float finv,
                      const std::string& isa) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), s4 = a.Cq / 4;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool i8 = x.dtype() == torch::kInt8, f32 = x.dtype() == torch::kFloat;
  const int8_t* x8 = i8 ? x.data_ptr<int8_t>() : nullptr;
  const int32_t* x32 = x.dtype() == torch::kInt32 ? x.data_ptr<int32_t>() : nullptr;
  const float* xf = f32 ? x.data_ptr<float>() : nullptr;
  const bool whole_rows = i8 && sC == 1 && sW == C;  // channels-last int8 rows: dword copies
  const bool channel_rows = sW == 1 && !whole_rows;                  // NCHW-like: each channel's rows in order
  // these two copies write every dword of the map (all channel quads): only the border needs its 128s
  const bool fills_map = whole_rows || channel_rows;
  thread_local std::vector<uint8_t> planes;
  const size_t plane_bytes = (size_t)N * a.image_bytes;
  if (planes.size() < plane_bytes) planes.resize(plane_bytes);
  uint8_t* xpd = planes.data();
  std::atomic<bool> out_of_range{false};
  auto code = [&](int64_t i) -> uint8_t {  // element i's code + 128
    if (f32) return float_code(xf[i], finv);
    const int32_t v = i8 ? x8[i] : x32[i];
    if (v < -128 || v > 127) out_of_range = true;
    return (uint8_t)(v + 128);
  };
  if (a.packed) {  // the packed-rows layout: each padded row [column][C], then 4 bytes of slack
    at::parallel_for(0, N * a.Hp, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / a.Hp, h = r % a.Hp - ph;
        uint8_t* row = xpd + b * a.image_bytes + (r % a.Hp) * a.row_bytes;
        if (r % a.Hp == a.Hp - 1) std::memset(row + a.row_bytes, 128, (size_t)(a.image_bytes - a.Hp * a.row_bytes));
        if (h < 0 || h >= H) { std::memset(row, 128, (size_t)a.row_bytes); continue; }
        std::memset(row, 128, (size_t)(pw * C));
        std::memset(row + (pw + W) * C, 128, (size_t)(a.row_bytes - (pw + W) * C));
        uint8_t* d = row + pw * C;
        if (whole_rows) {  // one run of W C codes: + 128 is a flip of the sign bit
          flip_copy(d, x8 + b * sN + h * sH, W * C);
          continue;
        }
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) d[w * C + c] = code(b * sN + c * sC + h * sH + w * sW);
      }
    });
    TORCH_CHECK(!out_of_range, "the compiled integer conv takes 8-bit input codes; got a code outside [-128, 127]");
    return xpd;
  }
  if (!fills_map) std::memset(xpd, 128, plane_bytes);
  // channel rows: byte j of each dword of a plane row from one input row (a channel past C: code 0)
  auto channel_row = [&](uint8_t* d, int j, const int64_t* off, int64_t n) {
    if (!off) { for (int64_t w = 0; w < n; ++w) d[4 * w + j] = 128; return; }
    if (f32 && isa == "avx512-vnni") { graph_vnni::quantize_row_byte(d, xf + *off, j, n, finv); return; }
    for (int64_t w = 0; w < n; ++w) d[4 * w + j] = code(*off + w);
  };
  if (fills_map)  // plane by plane: NCHW input is then read channel after channel, in its own order
    at::parallel_for(0, N * s4, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        uint8_t* pl = xpd + p * a.plane * 4;
        std::memset(pl, 128, (size_t)(ph * a.Wp + pw) * 4);  // top rows and the first row's left border
        for (int64_t h = 0; h + 1 < H; ++h)                     // right border of row h + left of row h + 1
          std::memset(pl + ((ph + h) * a.Wp + pw + W) * 4, 128, (size_t)(a.Wp - W) * 4);
        const int64_t end = (ph + H - 1) * a.Wp + pw + W;      // the last row's right border onwards
        std::memset(pl + end * 4, 128, (size_t)(a.plane - end) * 4);
        if (!channel_rows) continue;
        const int64_t b = p / s4, q = p % s4;
        for (int j = 0; j < 4; ++j)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t off = b * sN + (4 * q + j) * sC + h * sH;
            channel_row(pl + ((h + ph) * a.Wp + pw) * 4, j, 4 * q + j < C ? &off : nullptr, W);
          }
      }
    });
  if (!channel_rows) at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      uint8_t* row = xpd + (b * s4 * a.plane + (h + ph) * a.Wp + pw) * 4;
      if (whole_rows && C % 4 == 0 && isa == "avx512-vnni" && (int64_t)W * C < ((int64_t)1 << 31)) {
        graph_vnni::copy_quads(row, x8 + b * sN + h * sH, W, C, a.plane * 4);
        continue;
      }
      for (int64_t w = 0; w < W; ++w) {
        const int64_t src = b * sN + h * sH + w * sW;
        if (whole_rows) { offset_copy_pixel(row + w * 4, x8 + src, C, a.plane * 4); continue; }
        for (int64_t q = 0; q < s4; ++q) {  // a channel quad per plane (the last one may be short)
          uint8_t* d = row + (q * a.plane + w) * 4;
          for (int64_t c = 4 * q; c < std::min(C, 4 * q + 4); ++c) d[c - 4 * q] = code(src + c * sC);
        }
      }
    }
  });
  TORCH_CHECK(!out_of_range, "the compiled integer conv takes 8-bit input codes; got a code outside [-128, 127]");
  return xpd;
}

// x: (N, C, H, W) int8 or int32 codes, or float32 values quantized on the way in (codes
// clamp(round(x inv), -128, 127)), any strides; geom: kh, kw, sh, sw, ph, pw, dh, dw.
torch::Tensor conv(torch::Tensor x, double inv, std::vector<int64_t> geom, torch::Tensor wp, torch::Tensor wq,
                   torch::Tensor w0, torch::Tensor bias, int64_t mode, std::vector<torch::Tensor> tabs, torch::Tensor other,
                   int64_t qmin, int64_t qmax, std::string isa, int64_t rows) {
  TORCH_CHECK(x.dim() == 4 && (x.dtype() == torch::kInt8 || x.dtype() == torch::kInt32 || x.dtype() == torch::kFloat),
              "x: (N, C, H, W) int8 or int32 codes, or float32 values");
  TORCH_CHECK(geom.size() == 8, "geom: kh, kw, sh, sw, ph, pw, dh, dw");
  ConvArgs a{};
  a.kh = (int)geom[0]; a.kw = (int)geom[1]; a.sh = (int)geom[2]; a.sw = (int)geom[3];
  const int64_t ph = geom[4], pw = geom[5];
  a.dh = (int)geom[6]; a.dw = (int)geom[7];
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  a.K = wq.size(0); a.Cq = wq.size(2); a.Kp = w0.size(0);
  TORCH_CHECK(wq.size(1) == a.kh * a.kw && a.Cq == (C + 3) / 4 * 4, "the packed weights do not match the input");
  isa = winoq_isa::checked(isa);
  a.Hp = H + 2 * ph;
  a.OH = (a.Hp - (int64_t)a.dh * (a.kh - 1) - 1) / a.sh + 1;
  a.OW = (W + 2 * pw - (int64_t)a.dw * (a.kw - 1) - 1) / a.sw + 1;
  TORCH_CHECK(a.OH > 0 && a.OW > 0, "the conv's output would be empty");
  a.Wp = W + 2 * pw;
  const int taps = a.kh * a.kw;
  std::vector<int64_t> toff(taps);
  for (int t = 0; t < taps; ++t) toff[t] = (int64_t)(t / a.kw) * a.dh * a.Wp + (int64_t)(t % a.kw) * a.dw;
  a.toff = toff.data();
  a.plane = a.Hp * a.Wp;
  a.steps = wp.size(1);
  const bool packed = packed_rows(C, a.kw, a.dw), rows_layout = packed && isa == "avx512-vnni";
  a.packed = rows_layout;
  const int64_t rq = row_quads(C, a.kw);
  TORCH_CHECK(a.steps == packed_steps(C, a.kh, a.kw, a.dw),
              "the packed weights do not match the input (pack with the conv's column dilation)");
  a.row_bytes = rows_layout ? a.Wp * C : a.Wp * 4;
  a.pixel_bytes = rows_layout ? C : 4;
  a.image_bytes = rows_layout ? a.Hp * a.row_bytes + 4 : (a.Cq / 4) * a.plane * 4;  // (+ 4: the last dword's overread)
  std::vector<int64_t> soff((size_t)a.steps, 0);  // the padding steps read offset 0 (times zero weights)
  if (rows_layout)
    for (int ky = 0; ky < a.kh; ++ky)
      for (int64_t q = 0; q < rq; ++q) soff[ky * rq + q] = ky * a.dh * a.row_bytes + 4 * q;
  else if (!packed)  // (packed rows on another instruction set: the portable loops read wq, not the steps)
    for (int t = 0; t < taps; ++t)
      for (int64_t q = 0; q < a.Cq / 4; ++q) soff[t * (a.Cq / 4) + q] = (q * a.plane + toff[t]) * 4;
  a.soff = soff.data();
  auto bc = bias.to(torch::kInt32).contiguous();
  a.wp = wp.data_ptr<int8_t>(); a.wq = wq.data_ptr<int8_t>(); a.w0 = w0.data_ptr<int32_t>(); a.bias = bc.data_ptr<int32_t>();
  uint8_t* xpd = input_planes(x, a, ph, pw, (float)inv, isa);
  a.xp = xpd;
  auto y = mode == 3 ? torch::empty({N, a.K, a.OH, a.OW}, torch::kFloat)  // float out: NCHW, as float layers expect
         : torch::empty({N, a.K, a.OH, a.OW}, torch::TensorOptions().dtype(mode == 0 ? torch::kInt32 : torch::kInt8)
                                                  .memory_format(at::MemoryFormat::ChannelsLast));
  a.e = make_epi(mode, tabs, other, qmin, qmax, a.K, N * a.OH * a.OW);
  a.e.y = y.data_ptr();
  a.e.hw = a.OH * a.OW;
  // output rows per job: about 2^16 / Kp pixels (their int32 block within 256 KB), whole rows, and
  // no fewer jobs than threads
  const int64_t threads = at::get_num_threads();
  a.rows = rows > 0 ? rows : std::max<int64_t>(1, (((int64_t)1 << 16) / a.Kp) / a.OW);
  a.rows = std::min(a.rows, std::max<int64_t>(1, (N * a.OH + threads - 1) / threads));
  const int64_t per_image = (a.OH + a.rows - 1) / a.rows;
  at::parallel_for(0, N * per_image, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / per_image, oy0 = (j % per_image) * a.rows, oy1 = std::min(a.OH, oy0 + a.rows);
      if (isa == "avx512-vnni") graph_vnni::conv_rows(a, b, oy0, oy1);
      else if (isa == "avx2") graph_avx2::conv_rows(a, b, oy0, oy1);
      else graph_portable::conv_rows(a, b, oy0, oy1);
    }
  });
  return y;
}

// z: (N, K, H, W) channels-last int32 or int8 (the main input); the epilogue as in conv (mode 1 or 2).
torch::Tensor requantize(torch::Tensor z, int64_t mode, std::vector<torch::Tensor> tabs, torch::Tensor other,
                         int64_t qmin, int64_t qmax, std::string isa) {
  TORCH_CHECK(z.dim() == 4 && (z.dtype() == torch::kInt8 || z.dtype() == torch::kInt32) &&
              z.is_contiguous(at::MemoryFormat::ChannelsLast), "z: (N, K, H, W) channels-last int8 or int32");
  TORCH_CHECK(mode == 1 || mode == 2, "requantize: mode 1 or 2");  // (3, float out, exists only fused in a conv)
  const int64_t K = z.size(1), P = z.numel() / std::max<int64_t>(K, 1);
  Epi e = make_epi(mode, tabs, other, qmin, qmax, K, P);
  auto y = torch::empty(z.sizes(), torch::TensorOptions().dtype(torch::kInt8).memory_format(at::MemoryFormat::ChannelsLast));
  e.y = y.data_ptr();
  isa = winoq_isa::checked(isa);
  const void* zd = z.data_ptr();
  const int z32 = z.dtype() == torch::kInt32;
  at::parallel_for(0, P, 256, [&](int64_t p0, int64_t p1) {
    const char* zp = (const char*)zd + p0 * K * (z32 ? 4 : 1);
    if (isa == "avx512-vnni") graph_vnni::epilogue(e, p0, p1 - p0, zp, z32, K);
    else if (isa == "avx2") graph_avx2::epilogue(e, p0, p1 - p0, zp, z32, K);
    else graph_portable::epilogue(e, p0, p1 - p0, zp, z32, K);
  });
  return y;
}

// The integer model's one float -> integer step (IntegerModel.quantize_input) with int8 codes out:
// clamp(round_half_even(double(x) / scale), -qmax, qmax), channels-last, for the first layer's copy.
torch::Tensor quantize_input(torch::Tensor x, double scale, int64_t qmax, std::string isa) {
  TORCH_CHECK(x.dim() == 4 && x.dtype() == torch::kFloat, "quantize_input: (N, C, H, W) float32");
  TORCH_CHECK(qmax >= 0 && qmax <= 127, "quantize_input: int8 codes need qmax <= 127");
  isa = winoq_isa::checked(isa);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  auto y = torch::empty({N, C, H, W}, torch::TensorOptions().dtype(torch::kInt8).memory_format(at::MemoryFormat::ChannelsLast));
  const float* xd = x.data_ptr<float>();
  int8_t* yd = y.data_ptr<int8_t>();
  const double lim = (double)qmax;
  // each channel's row contiguous, offsets within int32: the vector path
  const bool gather = isa == "avx512-vnni" && sW == 1 && (C - 1) * std::abs(sC) + W < ((int64_t)1 << 31) && sC >= 0;
  const std::vector<int32_t> offsets = gather ? graph_vnni::gather_offsets(C, sC) : std::vector<int32_t>();
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    volatile double big = 6755399441055744.0;  // 1.5 * 2^52: (v + big) - big rounds |v| < 2^51 half to even
    const double bg = big;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      int8_t* row = yd + r * W * C;
      if (gather) {
        graph_vnni::quantize_row_gather(xd + b * sN + h * sH, offsets.data(), C, W, graph_vnni::InputCodes(scale, lim), row);
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const float* src = xd + b * sN + c * sC + h * sH;
        for (int64_t w = 0; w < W; ++w) {  // clamping first equals clamping after: the bounds are integers
          const double v = std::min(std::max((double)src[w * sW] / scale, -lim), lim);
          row[w * C + c] = (int8_t)(int)((v + bg) - bg);
        }
      }
    }
  });
  return y;
}

// max_pool2d of int8 codes (N, C, H, W), any layout, floor mode, no dilation: int8 channels-last out.
torch::Tensor max_pool(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                       std::string isa) {
  TORCH_CHECK(x.dim() == 4 && x.dtype() == torch::kInt8, "max_pool: (N, C, H, W) int8 codes");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
              "max_pool: kernel and stride > 0, 0 <= padding <= kernel / 2 (as max_pool2d)");
  isa = winoq_isa::checked(isa);
  x = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "max_pool: the output would be empty");
  auto y = torch::empty({N, C, OH, OW}, torch::TensorOptions().dtype(torch::kInt8).memory_format(at::MemoryFormat::ChannelsLast));
  const int8_t* xd = x.data_ptr<int8_t>();
  int8_t* yd = y.data_ptr<int8_t>();
  at::parallel_for(0, N * OH, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / OH, oy = r % OH;
      const int64_t y0 = std::max<int64_t>(0, oy * sh - ph), y1 = std::min<int64_t>(H, oy * sh - ph + kh);
      const int8_t* img = xd + b * H * W * C;
      int8_t* out = yd + r * OW * C;
      if (isa == "avx512-vnni") { graph_vnni::max_pool_row(img, out, C, H, W, OW, y0, y1, kw, sw, pw); continue; }
      for (int64_t ox = 0; ox < OW; ++ox) {
        const int64_t x0 = std::max<int64_t>(0, ox * sw - pw), x1 = std::min<int64_t>(W, ox * sw - pw + kw);
        for (int64_t c = 0; c < C; ++c) {
          int8_t v = -128;
          for (int64_t yy = y0; yy < y1; ++yy)
            for (int64_t xx = x0; xx < x1; ++xx) v = std::max(v, img[(yy * W + xx) * C + c]);
          out[ox * C + c] = v;
        }
      }
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("quantize_input", &quantize_input, "an integer model's input quantization, int8 channels-last out");
  mod.def("pack", &pack, "pack int8 weight codes of a direct integer conv");
  mod.def("conv", &conv, "direct integer conv with a fused requantization epilogue");
  mod.def("max_pool", &max_pool, "max_pool2d of int8 codes, channels-last out");
  mod.def("requantize", &requantize, "requantization / residual add of integer-graph values");
  mod.def("best_isa", &winoq_isa::best, "instruction set the kernels pick on this CPU");
}
