"""minglm: GLM (the General Language Model, Du et al. 2021) from scratch in NumPy, with CuPy on a GPU.

The layers, lowest first: backend (the xp seam) → tensor/functions (autograd) → functional (neural-network ops)
→ kernels → nn → model → tokenizer/data → optim/train → generate/finetune. A lower layer never imports a higher one.
"""

from minglm.tensor import Function, Tensor, is_grad_enabled, no_grad, tensor

__all__ = ["Function", "Tensor", "is_grad_enabled", "no_grad", "tensor"]
__version__ = "0.1.0"
