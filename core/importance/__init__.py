"""The method's scoring (IDAP++ §2 and §4): flow divergence of units, heads and blocks, the
calibration statistics it is computed from, and torch-pruning's criteria as baselines."""
