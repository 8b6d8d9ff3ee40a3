"""Data in: the built-in corpus and its checker, corpus files, packing, the Ray Data pipeline,
batch-generation prompts and fine-tuning rows."""
