"""Triton kernels (one op family per file, each with its launcher).

Importing this subpackage does not import triton; ``simvq_kernels.triton.ops`` does,
and is imported only when the 'triton' backend is used.
"""
