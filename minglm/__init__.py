"""minglm: GLM (the General Language Model, Du et al. 2021) from scratch in NumPy, with CuPy on a GPU.

The layers, lowest first: backend (the xp seam, parallel) → masks (GLM's mask) → tensor/ops (autograd) → kernels
(fused attention) → functional (neural-network ops) → nn → model → tokenizer/data → optim/checkpoint/runs/train →
generate/finetune/lora/prefix/interop → commands (``python -m minglm``). A lower layer never imports a higher one;
tests/test_layers.py checks every import.
"""

import os

# Process-wide tuning for CPU training (minglm/backend.py, ``tune_process``): a shorter spin of OpenBLAS's idle threads
# and a malloc that keeps large blocks. It is applied here, at import, whatever was imported before; MINGLM_TUNE=0 turns
# it off. When NumPy is not loaded yet, OpenBLAS picks the spin up from the environment as it loads (the cheap way).
if os.environ.get("MINGLM_TUNE", "1") != "0":
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")  # = backend.SPIN, set before NumPy loads OpenBLAS

from minglm.backend import tune_process  # noqa: E402 - after the environment is set

tune_process()

from minglm.tensor import Function, Tensor, is_grad_enabled, no_grad  # noqa: E402

# ``minglm.Tensor(data, requires_grad=True)`` makes a tensor; the name ``minglm.tensor`` is left to the module, so
# ``import minglm.tensor`` and ``minglm.tensor.Tensor`` mean what they say.
__all__ = ["Function", "Tensor", "is_grad_enabled", "no_grad"]
__version__ = "0.1.0"
