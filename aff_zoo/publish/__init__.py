"""Publishing: checkpoint folders, model cards, upload, and the generated README/docs tables."""
