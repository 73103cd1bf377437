// CSR argument checks shared by the evaluator's sparse CPU kernels (csr_mm, within_distance).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace perturbdiff::cpu {

// Raises unless ptr runs from 0 to nnz without decreasing and every index lies in [0, bound).
template <typename index_t>
void check_csr(const char* op, const char* name, const index_t* ptr, int64_t rows, const index_t* idx,
               int64_t nnz, int64_t bound) {
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[rows] == nnz, op, ": ", name,
                    "'s row pointers must run from 0 to its number of stored values (", nnz, "), got ",
                    ptr[0], " to ", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(ptr[r] <= ptr[r + 1], op, ": ", name, "'s row pointers decrease at row ", r);
  const auto [lo, hi] = std::minmax_element(idx, idx + nnz);
  TORCH_CHECK_VALUE(nnz == 0 || (*lo >= 0 && *hi < bound), op, ": ", name,
                    "'s column indices must lie in [0, ", bound, "), got [", nnz ? *lo : 0, ", ",
                    nnz ? *hi : 0, "]");
}

// The index dtype shared by all of `indices` (int32 or int64), else a TypeError naming `op`.
inline at::ScalarType csr_index_type(const char* op, std::initializer_list<const at::Tensor*> indices) {
  const auto type = (*indices.begin())->scalar_type();
  bool same = type == at::kInt || type == at::kLong;
  for (const at::Tensor* t : indices) same = same && t->scalar_type() == type;
  TORCH_CHECK_TYPE(same, op, ": row pointers and column indices must all be int32 or all int64");
  return type;
}

}  // namespace perturbdiff::cpu
