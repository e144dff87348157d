"""Our own linen modules, with transformers' parameter trees: one per family, and the layers they share."""
