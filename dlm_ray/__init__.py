"""dlm-ray: pretrain masked diffusion language models and sample from them at scale, on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dlm-ray")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0.0.0+unknown"
