"""ONNX export of stack levels, verification against PyTorch, and ONNX Runtime sessions."""
