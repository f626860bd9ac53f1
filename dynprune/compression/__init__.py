"""Deep Compression (Han et al. 2016): pruning -> k-means weight sharing -> Huffman coding, with an
exact decoder and size tables computed from the encoded bit streams."""

from dynprune.compression.codec import CompressedLayer, CompressedModel, compress_model
from dynprune.compression.huffman import HuffmanStream, huffman_decode, huffman_encode
from dynprune.compression.pipeline import (
    DeepCompressionConfig,
    DeepCompressionResult,
    deep_compression,
    model_bits,
    size_table,
)
from dynprune.compression.quantize import (
    SharedWeight,
    bake,
    kmeans_codebook,
    layer_bits,
    quantize_model,
    shared_weights,
)
from dynprune.compression.sparse import RelativeIndex, relative_encode, relative_positions

__all__ = [
    "CompressedLayer", "CompressedModel", "DeepCompressionConfig", "DeepCompressionResult", "HuffmanStream",
    "RelativeIndex", "SharedWeight", "bake", "compress_model", "deep_compression", "huffman_decode",
    "huffman_encode", "kmeans_codebook", "layer_bits", "model_bits", "quantize_model", "relative_encode",
    "relative_positions", "shared_weights", "size_table",
]
