// The integer Winograd step in portable C++ (winograd_int_step.cpp includes it twice: as is, and
// compiled for AVX2, where the compiler vectorizes what it can). One chunk of tiles, straight from
// the definition (IntWinogradConv2d.forward_torch): int64 arithmetic throughout, U unpacked.
void run_chunk(const StepArgs& a, int64_t p0, int64_t p1) {
  const int n = a.n, m = a.m, T = n * n;
  std::vector<int64_t> d(n * n), t1(n * n), v((size_t)T * a.Cp);
  std::vector<int> e((size_t)T * a.J);
  std::vector<int64_t> qm((size_t)T * a.K), t2((size_t)m * n);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t b; int ty, tx; tile_origin(a, p, b, ty, tx);
    const int8_t* base = a.xp + ((b * a.Hp + (int64_t)ty * m) * a.Wp + (int64_t)tx * m) * a.Cp;
    for (int64_t c = 0; c < a.Cp; ++c) {
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) d[i * n + j] = base[((int64_t)i * a.Wp + j) * a.Cp + c];
      for (int r = 0; r < n; ++r)
        for (int j = 0; j < n; ++j) {
          int64_t s = 0;
          for (int i = 0; i < n; ++i) s += (int64_t)a.bq[r * n + i] * d[i * n + j];
          t1[r * n + j] = rshift_away(s, a.sb);
        }
      for (int r = 0; r < n; ++r)
        for (int q = 0; q < n; ++q) {
          int64_t s = 0;
          for (int j = 0; j < n; ++j) s += t1[r * n + j] * (int64_t)a.bq[q * n + j];
          v[(size_t)(r * n + q) * a.Cp + c] = s;
        }
    }
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < a.J; ++j) {
        uint32_t o = 0;
        for (int c = 0; c < a.g; ++c) o |= (uint32_t)std::llabs(v[(size_t)t * a.Cp + j * a.g + c]);
        const int ex = std::max(0, bit_length(o) - a.v_bits);
        e[t * a.J + j] = ex;
        for (int c = 0; c < a.g; ++c) {
          int64_t& x = v[(size_t)t * a.Cp + j * a.g + c];
          x = std::min<int64_t>(std::max<int64_t>(rshift_away(x, ex), -a.v_range), a.v_range);
        }
      }
    for (int t = 0; t < T; ++t)
      for (int64_t k = 0; k < a.K; ++k) {
        const int8_t* uk = a.u + ((int64_t)t * a.K + k) * a.Cp;
        int64_t tot = 0;
        for (int j = 0; j < a.J; ++j) {
          int64_t s = 0;
          for (int c = j * a.g; c < (j + 1) * a.g; ++c) s += v[(size_t)t * a.Cp + c] * uk[c];
          tot += s << e[t * a.J + j];
        }
        tot = std::min<int64_t>(std::max<int64_t>(rshift_away(tot, a.pre_shift), -2147483647), 2147483647);
        const int64_t i = (int64_t)t * a.Kp + k;
        int64_t z = (tot * a.mb[i] + a.mhalf[i]) >> a.mc[i];
        qm[(size_t)t * a.K + k] = std::min<int64_t>(std::max<int64_t>(z, -a.m_range), a.m_range);
      }
    for (int64_t k = 0; k < a.K; ++k) {
      for (int r = 0; r < m; ++r)
        for (int j = 0; j < n; ++j) {
          int64_t s = 0;
          for (int i = 0; i < n; ++i) s += (int64_t)a.aq[r * n + i] * qm[(size_t)(i * n + j) * a.K + k];
          t2[r * n + j] = s;
        }
      for (int r = 0; r < m; ++r)
        for (int q = 0; q < m; ++q) {
          const int64_t oy = (int64_t)ty * m + r, ox = (int64_t)tx * m + q;
          if (oy >= a.OH || ox >= a.OW) continue;
          int64_t s = 0;
          for (int j = 0; j < n; ++j) s += t2[r * n + j] * (int64_t)a.aq[q * n + j];
          a.y[((b * a.OH + oy) * a.OW + ox) * a.K + k] = (int32_t)(rshift_away(s, a.so) + a.bias[k]);
        }
    }
  }
}
