"""Where models and runs are kept: pyarrow filesystems, the per-node checkpoint cache, staged
directory swaps, and the checkpoint formats (training checkpoints, LLaDA's layout)."""
