"""nofree's CPU kernels, in one place: its C kernels, compiled on first use (``build.py``) and
called only through their typed bindings (``bindings.py``), and frozen linear layers packed once
for PyTorch's oneDNN matrix kernels (``packing.py``).

The C sources: ``select.c`` (the anchor scan's candidate selection), ``int8_gemm.c`` (the int8
scan's matmul with the selection fused in, AVX-512 VNNI) and ``attention.c`` (attention over
listed keys, for the CLIP scorer's prefix tree); ``candidates.h`` and ``jobs.h`` hold what they
share. Every kernel has a torch twin beside its caller, used when no C compiler is around.
"""
