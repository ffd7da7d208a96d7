"""Model definitions (PyTorch). One Llama-family core shared by every runner and the ONNX exporter."""
