"""Tasks beyond classification: per task, the outputs it reads, its quality metric and budget, and
recovery's loss (README, Tasks)."""
