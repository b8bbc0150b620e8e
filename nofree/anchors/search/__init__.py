"""ASIF's top-k search: each query's k largest cosines among the anchors.

``exact.py`` scans every anchor (:func:`~nofree.anchors.search.exact.cosine_topk`: exact float32
top-k, optionally with low-precision candidates on CPU); ``precision.py`` holds the scan's
precisions (``SCAN_PRECISIONS``), the ``"auto"`` rule and each precision's codec and error bound;
``int8_gemm.py`` drives nofree's fused int8 matmul kernel (AVX-512 VNNI); ``index.py`` builds,
stores and searches an optional faiss index for sets too large to scan.
"""
