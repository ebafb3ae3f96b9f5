"""Recovery fine-tuning after each pruning step (method §5): distillation with feature matching."""
