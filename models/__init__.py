"""The model repository served by default (``models/<name>/model.onnx``) and the recipes
that produce its models (``models/<name>/train.py``)."""
