"""Pruning plans and applying them: the prunable groups of coupled units, the plan of which
units to remove, and the removal itself with compensation in the layers that read them."""
