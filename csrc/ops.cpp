// Schemas of the perturbdiff:: ops. Semantics: perturbdiff/ops/reference.py (the pure-torch oracle).
// Kernels: csrc/cpu (CPU), csrc/cuda (CUDA); fake and autograd registrations: perturbdiff/ops/_cpp.py.
#include <torch/library.h>

#include <string>

namespace perturbdiff {

// JSON describing what this binary was compiled with (read by `perturbdiff info`).
std::string build_info() {
  std::string cuda = PERTURBDIFF_WITH_CUDA ? "true" : "false";
  std::string archs = PERTURBDIFF_WITH_CUDA ? PERTURBDIFF_CUDA_ARCHS : "";
  return "{\"cpu\": true, \"cuda\": " + cuda + ", \"cuda_archs\": \"" + archs +
         "\", \"torch\": \"" + PERTURBDIFF_TORCH_VERSION + "\"}";
}

}  // namespace perturbdiff

TORCH_LIBRARY(perturbdiff, m) {
  // value[b] = sum_{p,q} c_blk(p,q) w_p w_q k(z_p, z_q) over Z = [X; Y] - center. When save_weights,
  // the second output is the [B, N, N] Laplacian diag(W 1) - W of W_pq = c w_p w_q k'(D_pq), which
  // the backward reuses instead of recomputing the Gram matrix (otherwise it is [0, N, N]).
  m.def("pairwise_mmd(Tensor x, Tensor y, Tensor xw, Tensor yw, Tensor coef, Tensor center, "
        "str kernel, float[] bandwidths, bool exclude_diag, bool save_weights=False) -> (Tensor, Tensor)");
  // Gradients of grad[b] * value[b] w.r.t. x and y; an output that is not asked for is empty.
  m.def("pairwise_mmd_backward(Tensor grad, Tensor x, Tensor y, Tensor xw, Tensor yw, Tensor coef, "
        "Tensor center, str kernel, float[] bandwidths, bool exclude_diag, Tensor saved, bool need_x, "
        "bool need_y) -> (Tensor, Tensor)");
  // out[b, q] = sum_i xw[b, i] k(x_bi, z_bq) (both centred by center[b]).
  m.def("kme(Tensor x, Tensor xw, Tensor z, Tensor center, str kernel, float[] bandwidths) -> Tensor");
  m.def("kme_backward(Tensor grad, Tensor x, Tensor xw, Tensor z, Tensor center, str kernel, "
        "float[] bandwidths, bool need_x, bool need_z) -> (Tensor, Tensor)");
  // Mann-Whitney U1 and pooled tie term sum(t^3 - t) minus the control's own, [P, G] each, of the
  // perturbations' cells (CSR with sorted unique column indices, rows grouped by perturbation from
  // seg_start) against the per-gene sorted control cells [G, n_ctrl]. CPU only; the torch version is
  // in evaluate/wilcoxon.py.
  m.def("rank_sum(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor seg_start, Tensor ctrl_sorted) "
        "-> (Tensor, Tensor)");
  // Per segment offsets[s]:offsets[s + 1] of cells split in two parts at split[s]: the mean Euclidean
  // distance over the pairs within each part ([2, S], self-pairs included as 0, NaN for an empty
  // part), every cell's squared norm, and per kernel (kernel_math.h, with the bandwidths) the mean
  // f(D) over the pairs within each part and between the parts ([K, 3, S]). Cells are rows of [CSR
  // part (ptr, idx, val; cols columns) | dense]. The evaluator's E|x - x'| for the e-distance and,
  // with predicted and real cells as the two parts, its set distances. CPU only.
  m.def("within_distance(Tensor ptr, Tensor idx, Tensor val, Tensor dense, Tensor offsets, Tensor split, "
        "int cols, str[] kernels, float[] bandwidths) -> (Tensor, Tensor, Tensor)");
  // Each cell's mean Euclidean distance to the cells of a reference set; cells are rows of [CSR part
  // (ptr, idx, val) | dense] with squared norms sq, the reference is given by its sparse part
  // transposed (CSR ref_ptr, ref_idx, ref_val: [len(ref_ptr) - 1 genes, m]), its dense part [m, d] and
  // squared norms [m]. The evaluator's E|x - c| to the control cells for the e-distance. CPU only.
  m.def("distance_to(Tensor ptr, Tensor idx, Tensor val, Tensor dense, Tensor sq, Tensor ref_ptr, "
        "Tensor ref_idx, Tensor ref_val, Tensor ref_dense, Tensor ref_sq) -> Tensor");
  // A CSR matrix split by column: the columns with position[k] < 0 stay a CSR matrix (ptr, idx, val;
  // same shape), column k >= 0 goes to column position[k] of a dense [n, dense_cols] matrix. The
  // evaluator's split of cells into sparse and dense genes. CPU only.
  m.def("split_columns(Tensor ptr, Tensor idx, Tensor val, Tensor position, int dense_cols) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Per group of rows of a CSR matrix (ptr, idx, val; cols columns), the sum of its rows as a float64
  // [groups, cols] tensor, group i being rows[offsets[i]:offsets[i + 1]]: the evaluator's pseudobulk
  // means. CPU only.
  m.def("group_sums(Tensor ptr, Tensor idx, Tensor val, Tensor rows, Tensor offsets, int cols) -> Tensor");
  // cell-eval's DE recovery metrics per perturbation from [P, G] float64 FDR and log2 fold changes of
  // the real and the predicted file (no NaN), as [2 (len(top_k) + 1) + 7, P] float64 rows: overlap_at_N,
  // precision_at_N, overlap_at_k and precision_at_k per k of top_k, de_direction_match,
  // de_spearman_lfc_sig, de_sig_genes_recall, de_nsig_counts_real, de_nsig_counts_pred, pr_auc, roc_auc.
  // CPU only; the torch version is in evaluate/de_metrics.py.
  m.def("de_metrics(Tensor fdr_real, Tensor lfc_real, Tensor fdr_pred, Tensor lfc_pred, float fdr_threshold, "
        "int[] top_k) -> Tensor");
  m.def("build_info() -> str", &perturbdiff::build_info);
}
