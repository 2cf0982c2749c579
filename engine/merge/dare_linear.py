"""`dare_linear`: drop entries at random (keep `density`, rescale by 1/density), then the weighted sum."""
from engine.merge.sparse import SparseTaskArithmetic

DARE_LINEAR = SparseTaskArithmetic("dare_linear", pruning="random", elect_sign=False)
