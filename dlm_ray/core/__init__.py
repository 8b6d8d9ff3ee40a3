"""Pure torch, no Ray, no DeepSpeed: the transformer, the model kinds, the objectives, the
samplers, the tokenizers and text in and out. Runs, and is tested, on a laptop CPU or one GPU."""
