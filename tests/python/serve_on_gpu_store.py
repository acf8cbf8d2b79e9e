"""``python -m turboquant`` with the GPU store on the reference kernels: a server's layers
are held by MetalCodeStore as on a GPU machine, where none is (test_serve_batch.py). Each
decode-attention call of the store appends a byte to the file named by
``TQ_TEST_GPU_CALLS`` (the test checks that the store served the requests)."""

from __future__ import annotations

import os
import sys

from turboquant import mlx_metal
from turboquant import gpu_path
from turboquant.__main__ import main


class CountingKernels(mlx_metal.ReferenceKernels):
    def decode_attention_heads(self, *args, **kwargs):
        with open(os.environ["TQ_TEST_GPU_CALLS"], "ab") as f:
            f.write(b".")
        return super().decode_attention_heads(*args, **kwargs)


gpu_path.active_path = lambda: "metal"
mlx_metal.METAL_KERNELS = CountingKernels()

if __name__ == "__main__":
    sys.exit(main())
