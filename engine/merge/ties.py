"""`ties`: magnitude-prune each factor to `density`, elect the sign per entry, average the agreeing donors."""
from engine.merge.sparse import SparseTaskArithmetic

TIES = SparseTaskArithmetic("ties", pruning="magnitude", elect_sign=True)
