"""Stage 5 of `pneumoscan run`: what a run keeps and tells (the state ledger, the run log,
pseudonyms, studies and counts)."""
