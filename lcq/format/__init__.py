"""The packed LCQ format: index packing, the reference dequantization and checkpoint I/O.

This package sits at the bottom of lcq and imports nothing else from it.
"""
from .checkpoint import (EMBED, FORMAT_VERSION, HEAD, QUANT_METHOD, CheckpointReader, FormatError, copy_model_assets,
                         linear_tensors, quantization_config, stored_tensor_names, WriteError, write_index, write_json,
                         write_shard)
from .codebook import (PackedLinear, codebooks, decoded_b, decoded_s, dequantize, dual_quantize, encode_linear,
                       layer_codebooks, output_rows, padded_in_features, stored_bytes)
from .packing import SUPPORTED_BITS, pack_indices, plane_layout, unpack_indices
from .views import VIEWED_ARCHITECTURES, StoredTensor, ViewError, source_parts, view_config, view_tensors

__all__ = [
    "EMBED", "FORMAT_VERSION", "HEAD", "QUANT_METHOD", "CheckpointReader", "FormatError", "copy_model_assets",
    "linear_tensors", "quantization_config", "stored_tensor_names", "WriteError", "write_index", "write_json", "write_shard", "PackedLinear", "codebooks", "decoded_b",
    "decoded_s", "dequantize", "dual_quantize", "encode_linear", "layer_codebooks", "output_rows", "padded_in_features",
    "stored_bytes", "SUPPORTED_BITS", "pack_indices", "plane_layout", "unpack_indices", "VIEWED_ARCHITECTURES",
    "StoredTensor", "ViewError", "source_parts", "view_config", "view_tensors",
]
