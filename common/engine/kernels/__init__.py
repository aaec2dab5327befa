"""GPU kernels (Triton), each beside the plain PyTorch reference that the CPU path and the tests use."""
