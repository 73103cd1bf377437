"""Public kernel ops: one API over the torch, C++ CPU, CUDA and Triton backends."""

from ._backends import available_backends
from .api import MMDLoss, energy_distance, kme, last_backend, mmd, witness
from .rff import RFFMap, rff_features, rff_mmd, set_distances, set_embedding

__all__ = ["mmd", "energy_distance", "kme", "witness", "MMDLoss", "available_backends", "last_backend",
           "RFFMap", "rff_features", "set_embedding", "rff_mmd", "set_distances"]
