"""Export a trained run to the self-describing ONNX file the runtime loads (TensorFlow side)."""
