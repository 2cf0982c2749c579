"""`dare_ties`: DARE's random drop and rescale, then TIES's sign election and disjoint mean."""
from engine.merge.sparse import SparseTaskArithmetic

DARE_TIES = SparseTaskArithmetic("dare_ties", pruning="random", elect_sign=True)
