"""Deployment: ONNX/TorchScript export with parity checks, and the speed benchmark."""
