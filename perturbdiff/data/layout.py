"""File names of a prepared store folder and its format version (shared by writer and reader).

A store is a folder::

    meta.json      genes, vocabularies, keys, control label, provenance, preprocessing report
    indptr.npy     int64 [n_cells + 1]  CSR row pointers  (cells sorted by group)
    indices.npy    int32 [nnz]          gene columns
    data.npy       float32 [nnz]        log1p(normalised) expression
    obs.npz        int32 codes per row (perturbation/context/batch), orig_index, obs_names
    groups.npz     one entry per group: codes, start, stop (row range in the store)
"""
FORMAT_VERSION = 1
META = "meta.json"
INDPTR = "indptr.npy"
INDICES = "indices.npy"
DATA = "data.npy"
OBS = "obs.npz"
GROUPS = "groups.npz"
ROLES = ("perturbation", "context", "batch")
NO_BATCH = "<none>"
