"""winoq: post-training compression for conv nets and diffusion UNets, centred on
data-free group-wise fully quantized Winograd convolution with learned transform scales."""
from .api import LayerReport, load, quantize, save, set_kernel
from .recipe import Recipe

__version__ = "0.1.0"
__all__ = ["Recipe", "quantize", "save", "load", "LayerReport", "set_kernel", "__version__"]
