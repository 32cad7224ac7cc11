"""Sparse training: mask passes on the fx graph, layer budgets, prune-grow methods."""
