"""Expert pruning: which experts to keep (criteria) and the pruned tensor list (apply)."""
