"""The ONNX path: a classifier exported to ONNX (any exporter) becomes a dense ONNX model.

``graph`` indexes the graph and reads initializers and shapes; ``fc_head`` finds where the
trunk ends and the classifier's FC head begins; ``fc_head_build`` writes the convolutional head
that replaces the head's Gemm/MatMul layers.
"""
