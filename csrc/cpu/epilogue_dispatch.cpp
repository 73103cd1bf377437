#include "cpu/epilogue_dispatch.h"

#include <ATen/Version.h>

namespace perturbdiff::cpu {

bool use_avx2_epilogue() {
#if PERTURBDIFF_HAVE_AVX2
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

template <>
const EpilogueTable<float>& epilogue<float>() {
#if PERTURBDIFF_HAVE_AVX2
  if (use_avx2_epilogue()) return AVX2::epilogue_float();
#endif
  return DEFAULT::epilogue_float();
}

template <>
const EpilogueTable<double>& epilogue<double>() {
#if PERTURBDIFF_HAVE_AVX2
  if (use_avx2_epilogue()) return AVX2::epilogue_double();
#endif
  return DEFAULT::epilogue_double();
}

}  // namespace perturbdiff::cpu
