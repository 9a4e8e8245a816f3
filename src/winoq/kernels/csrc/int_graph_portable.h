// The direct conv and the requantization epilogue of winoq's integer graphs in portable C++
// (int_graph.cpp includes it twice: as is, and compiled for AVX2, where the compiler vectorizes what
// it can). Straight from the definitions: IntConv2d.forward, Requantize.forward, IntAdd.forward.

// rows p0 .. p0 + np of the epilogue; z: the main input's rows (ldz values apart)
void epilogue(const Epi& e, int64_t p0, int64_t np, const void* z, int z32, int64_t ldz) {
  if (e.mode == 3) { epilogue_float(e, p0, np, (const int32_t*)z, ldz); return; }
  for (int64_t i = 0; i < np; ++i)
    for (int64_t k = 0; k < e.K; ++k) {
      const int64_t v = z32 ? ((const int32_t*)z)[i * ldz + k] : ((const int8_t*)z)[i * ldz + k];
      epilogue_one(e, p0 + i, k, v);
    }
}

// output rows oy0 .. oy1 of image b of a direct conv, int64 sums from the unpacked codes
void conv_rows(const ConvArgs& a, int64_t b, int64_t oy0, int64_t oy1) {
  const int taps = a.kh * a.kw;
  const uint8_t* img = image_planes(a, b);
  thread_local std::vector<int32_t> buf;
  buf.resize((size_t)a.OW * a.K);
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ox = 0; ox < a.OW; ++ox)
      for (int64_t k = 0; k < a.K; ++k) {
        int64_t s = a.bias[k];
        for (int t = 0; t < taps; ++t) {
          const int64_t pos = oy * a.sh * a.Wp + ox * a.sw + a.toff[t];
          const int8_t* w = a.wq + (k * taps + t) * a.Cq;
          for (int64_t c = 0; c < a.Cq; ++c) s += ((int32_t)img[((c / 4) * a.plane + pos) * 4 + c % 4] - 128) * (int32_t)w[c];
        }
        buf[(size_t)ox * a.K + k] = (int32_t)s;  // fits: the converter keeps int32 convs inside int32
      }
    epilogue(a.e, (b * a.OH + oy) * a.OW, a.OW, buf.data(), 1, a.K);
  }
}
