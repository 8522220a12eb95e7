"""The torch path: a classifier ``nn.Module`` becomes a fully convolutional module.

``trace`` captures the graph with ``torch.fx`` and reads shapes; ``ops`` says which ops are
local (per position) and so belong to a trunk; ``fc_head`` and ``fc_head_region`` find the
classifier's FC head, ``flatten`` and ``layout`` read the flatten order and channel-last blocks;
``rewrite`` and ``fc`` replace the head's Linear layers by convolutions; ``weights`` loads
trained ``.pth`` files. The result is exported to ONNX by :mod:`densemap.convert.export`.
"""
