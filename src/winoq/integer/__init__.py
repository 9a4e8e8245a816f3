"""Integer-only inference (HAWQ-V3): BN folding, static calibration, dyadic requantization,
integer residual adds and pooling; ONNX export of the result. For models that cannot run in
integers end to end (diffusion UNets): int8 convs inside the float model (``int8_convs``)."""
from .convert import IntegerConfig, IntegerConversionError, convert, layer_names, trace
from .dyadic import DyadicRangeError, dyadic, requantize
from .int8_convs import Int8Conv2d, int8_convs
from .model import IntegerModel, LayerInfo
from .runtime import CompiledIntegerModel, compile_model

__all__ = ["IntegerConfig", "IntegerConversionError", "convert", "layer_names", "trace", "DyadicRangeError",
           "dyadic", "requantize", "Int8Conv2d", "int8_convs", "IntegerModel", "LayerInfo", "CompiledIntegerModel", "compile_model"]
