"""Training pipeline for the batchwbc classifier (TensorFlow/Keras; run from a checkout).

The runtime package `batchwbc` never imports this; the two share only the class catalogue,
the dataset readers and the preprocessing contract, which all live in `batchwbc`.
"""
