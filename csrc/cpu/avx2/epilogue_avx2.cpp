// The tile epilogues built with AVX2 + FMA (CMake sets CPU_CAPABILITY=AVX2 for this file only).
#include "cpu/epilogue.cpp"
