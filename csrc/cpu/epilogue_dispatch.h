// Picks the tile epilogue compiled for the best CPU capability this machine (and ATen) allows.
// ATEN_CPU_CAPABILITY=default forces the portable build, as it does for ATen's own kernels.
#pragma once

#include "cpu/epilogue.h"

namespace perturbdiff::cpu {

namespace DEFAULT {
const EpilogueTable<float>& epilogue_float();
const EpilogueTable<double>& epilogue_double();
}  // namespace DEFAULT

#if PERTURBDIFF_HAVE_AVX2
namespace AVX2 {
const EpilogueTable<float>& epilogue_float();
const EpilogueTable<double>& epilogue_double();
}  // namespace AVX2
#endif

// True when the AVX2 epilogue is compiled in and ATen reports AVX2 or better.
bool use_avx2_epilogue();

template <typename T>
const EpilogueTable<T>& epilogue();

}  // namespace perturbdiff::cpu
