"""Stages 3 and 4 of `pneumoscan run`: model input from the model's own metadata, batched ONNX
Runtime inference and the class activation maps. Never imports torch."""
