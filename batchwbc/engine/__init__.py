"""Inference: decoding and preprocessing crops, the ONNX classifier and its metadata, the
out-of-distribution and data-shift checks, the result cache and the crash-isolating
worker pool that runs them.
"""
