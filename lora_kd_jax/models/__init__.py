"""Models: the families (one record each), their linen modules, the classifier on top, Hugging Face checkpoints and names, tokenizers, and the students."""
