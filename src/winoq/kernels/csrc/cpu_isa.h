// The instruction set winoq's compiled CPU kernels pick at run time (every kernel of csrc/ reads it).
#pragma once
#include <torch/extension.h>

#include <string>

namespace winoq_isa {

inline std::string best() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    return "avx512-vnni";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "portable";
}

// the requested instruction set ("" = the best one), refusing unknown names
inline std::string checked(const std::string& isa) {
  const std::string r = isa.empty() ? best() : isa;
  TORCH_CHECK(r == "avx512-vnni" || r == "avx2" || r == "portable", "isa must be avx512-vnni, avx2 or portable, got ", r);
  return r;
}

}  // namespace winoq_isa
