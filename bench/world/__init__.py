"""A deterministic synthetic world for the demo and the benchmark: task families, a base, donors, targets."""
