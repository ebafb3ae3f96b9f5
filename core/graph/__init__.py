"""Model structure: forward passes with hooks, attention modules and their heads, and the
residual blocks that Stage 2 can remove. Depends on nothing else in core."""
