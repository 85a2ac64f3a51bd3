"""Triton kernels (one op family per file, each with its launcher).

- ``common.py``: how a kernel is built (compiled for CUDA tensors, interpreted for CPU
  tensors), launched and configured; the ``SIMVQ_TRITON_SPLIT_K`` override;
- ``nearest_code.py``: the fused search (tl.dot tiles + running argmin, split-K);
- ``prologue.py``: the projection Q = B W^T + b and row squared norms;
- ``quantize_backward.py``: grad_weight as a gather-GEMM;
- ``ops.py``: the registered ops ``torch.ops.simvq_triton.*`` (triton_op);
- ``aot.py``: every configuration compiled ahead of time for sm_90a / sm_80
  (``python -m simvq_kernels.info --kernels``).

Importing this subpackage does not import triton; its modules do, and are imported
only when the 'triton' backend is used (or by ``info --kernels``).
"""
