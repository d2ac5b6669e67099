"""minglm: GLM (the General Language Model, Du et al. 2021) from scratch in NumPy, with CuPy on a GPU.

The layers, lowest first: backend (the xp seam, parallel) → masks (GLM's mask) → tensor/ops (autograd) → kernels
(fused attention) → functional (neural-network ops) → nn → model → tokenizer/data → optim/checkpoint/runs/train →
generate/finetune/lora/prefix/interop → commands (``python -m minglm``). A lower layer never imports a higher one;
tests/test_layers.py checks every import.
"""

import os
import sys

# OpenBLAS's idle threads spin for about 0.1 s (2^28 cycles) after each matrix product before they sleep. minglm
# runs its non-GEMM passes on the same cores between the products (minglm/parallel.py), and a spinning BLAS thread
# takes a core from them: the small benchmark step on 2 cores was 10-20 % slower. 2^18 cycles (about 0.1 ms) keeps
# back-to-back products fast (2^14 made the many small products of the default training run 15 % slower) and frees
# the cores soon after. OpenBLAS reads this once, when NumPy loads it, so it only takes effect when minglm is imported
# before NumPy (``python -m minglm ...`` always is), and a value the user set is kept.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

from minglm.tensor import Function, Tensor, is_grad_enabled, no_grad

# ``minglm.Tensor(data, requires_grad=True)`` makes a tensor; the name ``minglm.tensor`` is left to the module, so
# ``import minglm.tensor`` and ``minglm.tensor.Tensor`` mean what they say.
__all__ = ["Function", "Tensor", "is_grad_enabled", "no_grad"]
__version__ = "0.1.0"
