// Fixed-point int8 Winograd convolution for CPUs (the "cpu" kernel of winoq).
//
// Layout: input and output NHWC float (channels-last tensors). The tiles run in chunks (one
// parallel job each, run() in the body; or one chunk whose phases the threads split,
// run_shared()): phase A writes V of the chunk's tiles as
// [taps][tiles][channels] u8 (u8 = code + 128, or code minus V's zero point plus 128 with zero
// points; each channel group padded to a multiple of 4); phase B runs, per tap, the int8 GEMM
// [tiles x channels] x [channels x K] with U pre-packed as
// [tap][conv group][32 output channels][group][channels/4][32][4] so that one vpdpbusd
// multiplies 4 channels of a tile by 4 channels of 16 output channels; a slice of U (one tap,
// 32 output channels) is reused by every 8-tile register block of the chunk; the offset of V's
// u8 codes (128, or 128 + its zero point: per tile, tap and group) is removed as
// offset * sum(U), with sum(U) per output channel and group precomputed; M is float32
// [taps][conv group][K/32][tiles][32]; phase C requantizes M and runs the output transform
// per 32-channel piece. The input transform runs in int16 lanes (32 channels per vector) when
// its rows are exact small integers (V per tap, F(2,3) / F(4,3): fixed_point.Plan.input16), else
// in int32. The instruction set is picked at run time: AVX-512 VNNI, AVX2, or portable C++.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "cpu_isa.h"

namespace {

struct Args {
  const float* x; int64_t N, C, H, W;  // NHWC
  int pad_t, pad_l, m, n, th, tw; int64_t OH, OW, P, Pp;
  const float* rx; int64_t rs[4];       // (N, th, tw, C) input multipliers, strides
  const float* sx; int64_t ss[4];       // input scales, strides
  const float* zp; int64_t zs[4];       // input zero points (integers as floats), strides
  const int32_t* bq; int kb; const float* vfac;  // kb, ka: the shift after the first pass; vfac: V's real factor per tap
  int in16;                            // the input transform in int16 lanes (fixed_point.Plan.input16)
  float pow_ka;                        // M's scale 2^(s - 2k)
  const int32_t* aq; int ka;
  int G, cg, kg, gs, J, gs4, kgp, gsm; int64_t Cp;
  const int8_t* up; const int32_t* usum; const float* su;  // packed U; sum U and U scales [taps][G][J][kgp]
  const float* usf;                    // sum U as floats when the GEMM's flush is exact in float32 (else null)
  float Qv; int v_min, v_max, v_tapwise, v_zero_point;  // v_tapwise: one V scale per tap; Qv = qmax - qmin with zero points
  float Qm; int m_min, m_max;
  int in_min, in_max;
  int tile_scales, in_gs; float Qin;  // input scales computed per tile in the kernel (rx, sx, zp unused), groups of in_gs
  int zero_point;                     // ... with zero points (Qin = qmax - qmin)
  const float* bias;
  uint8_t* v8; float* sv; int32_t* zv; float* mf; float* mx; float* y;  // per-thread chunk buffers (run()): zv = V's u8 offset, mx = max |M| over the taps; output
  int64_t p_base;                               // first tile of the block in the buffers
};

constexpr int PB = 8;  // tiles per GEMM block: 16 zmm accumulators

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
namespace isa_vnni {
#define WINOQ_VNNI 1
#include "winograd_int8_body.h"
#undef WINOQ_VNNI
}  // namespace isa_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#define WINOQ_VNNI 0
#include "winograd_int8_body.h"
#undef WINOQ_VNNI
}  // namespace isa_avx2
#pragma GCC pop_options

namespace isa_portable {
#define WINOQ_VNNI 0
#include "winograd_int8_body.h"
#undef WINOQ_VNNI
}  // namespace isa_portable

namespace {

// u: (taps, K, cg) int8 codes, groups G; returns packed U and usum (sum of U per group) as
// [taps][G][J][kgp] int32, kgp = K/G rounded up to 32.
std::vector<torch::Tensor> pack_u(torch::Tensor u, int64_t G, int64_t gs) {
  TORCH_CHECK(u.dtype() == torch::kInt8 && u.dim() == 3, "pack_u: (taps, K, cg) int8");
  u = u.contiguous();
  const int64_t taps = u.size(0), K = u.size(1), cg = u.size(2), kg = K / G;
  const int64_t J = (cg + gs - 1) / gs, gs4 = (gs + 3) / 4 * 4, kgp = (kg + 31) / 32 * 32, nkb = kgp / 32;
  auto packed = torch::zeros({taps, G, nkb, J, gs4 / 4, 32, 4}, torch::kInt8);
  auto usum = torch::zeros({taps, G, J, kgp}, torch::kInt32);
  const int8_t* src = u.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* cr = usum.data_ptr<int32_t>();
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t kk = 0; kk < kg; ++kk)
        for (int64_t c = 0; c < cg; ++c) {
          const int8_t val = src[(t * K + g * kg + kk) * cg + c];
          const int64_t j = c / gs, cc = c % gs;
          const int64_t idx = (((((t * G + g) * nkb + kk / 32) * J + j) * (gs4 / 4) + cc / 4) * 32 + kk % 32) * 4 + cc % 4;
          dst[idx] = val;
          cr[((t * G + g) * J + j) * kgp + kk] += (int32_t)val;
        }
  return {packed, usum};
}

torch::Tensor forward(torch::Tensor x, std::vector<int64_t> pad_tl, std::vector<int64_t> geom,
                      torch::Tensor rx, torch::Tensor sx, torch::Tensor zp, torch::Tensor bq, torch::Tensor vfac,
                      torch::Tensor aq, std::vector<int64_t> shifts,
                      std::vector<int64_t> groups, torch::Tensor packed, torch::Tensor usum, torch::Tensor su,
                      std::vector<double> vq, std::vector<double> mq, std::vector<int64_t> in_range,
                      std::vector<double> tile_in,
                      c10::optional<torch::Tensor> bias, std::string isa) {
  // geom: m, n, th, tw, OH, OW ; groups: G, gs, gsm, K ; vq/mq: Q, qmin, qmax (vq: then 1 for V per tap, 1 for V zero points)
  TORCH_CHECK(x.dim() == 4 && x.dtype() == torch::kFloat32, "x: (N, C, H, W) float32");
  TORCH_CHECK(rx.dtype() == torch::kFloat32 && sx.dtype() == torch::kFloat32 && zp.dtype() == torch::kFloat32 &&
              rx.dim() == 4 && sx.dim() == 4 && zp.dim() == 4, "rx, sx, zp: (N, th, tw, C) float32");
  auto xh = x.contiguous(at::MemoryFormat::ChannelsLast);
  Args a{};
  a.x = xh.data_ptr<float>(); a.N = x.size(0); a.C = x.size(1); a.H = x.size(2); a.W = x.size(3);
  a.pad_t = (int)pad_tl[0]; a.pad_l = (int)pad_tl[1];
  a.m = (int)geom[0]; a.n = (int)geom[1]; a.th = (int)geom[2]; a.tw = (int)geom[3]; a.OH = geom[4]; a.OW = geom[5];
  a.P = a.N * a.th * a.tw; a.Pp = PB;
  a.rx = rx.data_ptr<float>(); a.sx = sx.data_ptr<float>();
  a.zp = zp.data_ptr<float>();
  for (int i = 0; i < 4; ++i) { a.rs[i] = rx.stride(i); a.ss[i] = sx.stride(i); a.zs[i] = zp.stride(i); }
  auto bqc = bq.to(torch::kInt32).contiguous(), aqc = aq.to(torch::kInt32).contiguous();
  // shifts: the input transform's first-pass shift, 1 for int16 lanes; the output transform's shift and
  // scale exponent (fixed_point.py: s, s - 2k); vfac: V's real factor per tap (fixed_point.Plan.v_factor)
  TORCH_CHECK(shifts.size() == 4, "shifts: (sb, input16, sa, sa - 2 ka)");
  auto vfc = vfac.to(torch::kFloat32).contiguous();
  TORCH_CHECK(vfc.numel() == geom[1] * geom[1], "vfac: one factor per tap");
  a.bq = bqc.data_ptr<int32_t>(); a.kb = (int)shifts[0]; a.vfac = vfc.data_ptr<float>(); a.in16 = shifts[1] != 0;
  TORCH_CHECK(!a.in16 || a.kb == 0, "int16 input lanes take no first-pass shift");
  a.aq = aqc.data_ptr<int32_t>(); a.ka = (int)shifts[2]; a.pow_ka = std::ldexp(1.0f, (int)shifts[3]);
  const int64_t K = groups[3];
  a.G = (int)groups[0]; a.cg = (int)(a.C / a.G); a.kg = (int)(K / a.G); a.gs = (int)groups[1]; a.gsm = (int)groups[2];
  a.J = (a.cg + a.gs - 1) / a.gs; a.gs4 = (a.gs + 3) / 4 * 4; a.kgp = (a.kg + 31) / 32 * 32;
  a.Cp = (int64_t)a.G * a.J * a.gs4;
  TORCH_CHECK(packed.numel() == (int64_t)a.n * a.n * a.G * a.kgp * a.J * a.gs4, "packed U does not match the layer");
  TORCH_CHECK(su.numel() == (int64_t)a.n * a.n * a.G * a.J * a.kgp && usum.numel() == su.numel(), "su / usum shape");
  auto suc = su.contiguous();
  a.up = packed.data_ptr<int8_t>(); a.usum = usum.data_ptr<int32_t>(); a.su = suc.data_ptr<float>();
  // |acc| <= gs4 * 255 * 128 and |offset * sum U| as much: below 2^24 both, and their difference, are
  // exact float32 integers, so fnmadd(offset, sum U, acc) is the int32 acc - offset * sum U
  torch::Tensor usf;
  if ((int64_t)a.gs4 * 255 * 128 * 2 < (1 << 24)) { usf = usum.to(torch::kFloat32).contiguous(); a.usf = usf.data_ptr<float>(); }
  TORCH_CHECK(vq.size() == 5 && mq.size() == 3, "vq: (Q, qmin, qmax, V per tap, V zero points), mq: (Q, qmin, qmax)");
  a.Qv = (float)vq[0]; a.v_min = (int)vq[1]; a.v_max = (int)vq[2];
  a.v_tapwise = vq[3] != 0.0; a.v_zero_point = vq[4] != 0.0;
  TORCH_CHECK(a.n <= 8, "the kernel's transforms hold tiles of at most 8 x 8 (F(6,3), F(4,5), F(2,7))");
  a.Qm = (float)mq[0]; a.m_min = (int)mq[1]; a.m_max = (int)mq[2];
  TORCH_CHECK(!(a.m_max > 127 || a.m_min < -128) || a.ka == 0,
              "an M wider than 8 bits runs its output transform exactly in float64, with no first-pass shift");
  a.in_min = (int)in_range[0]; a.in_max = (int)in_range[1];
  // tile_in: (1 = the kernel computes per-tile input scales, their Q, the input channel-group length,
  // 1 = with zero points)
  a.tile_scales = tile_in.size() == 4 && tile_in[0] != 0.0;
  if (a.tile_scales) {
    a.Qin = (float)tile_in[1]; a.in_gs = (int)tile_in[2]; a.zero_point = tile_in[3] != 0.0;
    TORCH_CHECK(a.in_gs > 0, "in_gs");
  }
  torch::Tensor bc;
  if (bias.has_value()) { bc = bias->to(torch::kFloat32).contiguous(); a.bias = bc.data_ptr<float>(); }
  // channels-last output: contiguous stores, and the next Winograd layer's input layout as it is
  auto y = torch::empty({a.N, K, a.OH, a.OW}, torch::TensorOptions().dtype(torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
  a.y = y.data_ptr<float>();
  if (isa.empty()) isa = winoq_isa::best();
  if (isa == "avx512-vnni") isa_vnni::run(a);
  else if (isa == "avx2") isa_avx2::run(a);
  else if (isa == "portable") isa_portable::run(a);
  else TORCH_CHECK(false, "isa must be avx512-vnni, avx2 or portable, got ", isa);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("pack_u", &pack_u, "pack int8 U codes for the GEMM");
  mod.def("forward", &forward, "fixed-point int8 Winograd conv");
  mod.def("best_isa", &winoq_isa::best, "instruction set the kernel picks on this CPU");
}
