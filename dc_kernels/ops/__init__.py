"""Backends of the Dense Connector ops: ``torch_ops`` (pure PyTorch) and the Triton kernels."""
