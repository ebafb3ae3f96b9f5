"""One compression run: its context, Stage 1 and Stage 2, drift allocation, the preflight, and
`compress`, which runs them."""
