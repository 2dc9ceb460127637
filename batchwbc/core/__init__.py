"""The pure core: the class catalogue, differentials, flags, settings, summaries, verification
and agreement arithmetic. No numpy-heavy IO, no onnxruntime, no OpenCV, so reading a
workbook or flagging a differential stays light.
"""
