"""Integer-only inference (HAWQ-V3): BN folding, static calibration, dyadic requantization,
integer residual adds and pooling; ONNX export of the result."""
from .convert import IntegerConfig, IntegerConversionError, convert, layer_names, trace
from .dyadic import DyadicRangeError, dyadic, requantize
from .model import IntegerModel, LayerInfo
from .runtime import CompiledIntegerModel, compile_model

__all__ = ["IntegerConfig", "IntegerConversionError", "convert", "layer_names", "trace", "DyadicRangeError",
           "dyadic", "requantize", "IntegerModel", "LayerInfo", "CompiledIntegerModel", "compile_model"]
