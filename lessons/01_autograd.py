# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 1 — Autograd: tensors, the chain rule and the graph
#
# Every number a GLM learns is moved by a gradient, and every gradient in minglm comes from one small engine,
# `minglm/tensor.py`. This lesson takes that engine apart on expressions small enough to check by hand:
#
# 1. a **tensor** is an array that remembers the op that made it;
# 2. those memories form a **graph**, and `backward()` walks it from the output back to the inputs;
# 3. along the way it applies the **chain rule**: multiply local derivatives along each path, add the paths;
# 4. we never have to *trust* a backward: **gradcheck** compares it with finite differences.
#
# The code that does all of this is short. Keep `minglm/tensor.py` open beside this notebook.
#
# **Learning goals.** Draw the graph of an expression, derive its gradients with the chain rule and match the
# engine's, add an op of your own, and check any backward with finite differences.

# %%
# %matplotlib inline
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("minglm") is None:  # opened from lessons/ without `pip install -e .`
    sys.path.insert(0, str(Path.cwd().parent))

import matplotlib.pyplot as plt
import numpy as np

import minglm
import minglm.functional as F
import viz
from minglm import exercises
from minglm.tensor import Function
from minglm.testing import GradcheckError, gradcheck

rng = np.random.default_rng(0)  # one seeded generator for the whole lesson

# %% [markdown]
# ## 1. A tensor is an array with a memory
#
# `minglm.Tensor(data, requires_grad=True)` makes a *leaf*: a tensor we want gradients for. Python floats become
# float32, as in PyTorch; pass a float64 NumPy array when you want float64. Doing arithmetic on tensors gives new
# tensors, and each new tensor keeps a pointer, `grad_fn`, to the op (a `Function`) that produced it.

# %%
a = minglm.Tensor(2.0, requires_grad=True)
b = minglm.Tensor(-3.0, requires_grad=True)
c = minglm.Tensor(10.0, requires_grad=True)

u = a * b + c  # u = -6 + 10 = 4
f = u.tanh() * a  # f = tanh(4) * 2

print("a:", a, " dtype", a.dtype)
print("u:", u)
print("f:", f)
print("f was made by", f.grad_fn.name, "from", f.grad_fn.inputs)

# %% [markdown]
# A leaf has `grad_fn = None`. Every other tensor's `grad_fn.inputs` points at the tensors it was computed from,
# so from `f` we can reach everything that influenced it. Here is that structure, printed by following the
# pointers (this is exactly what `backward()` will walk):

# %%
names = {id(a): "a", id(b): "b", id(c): "c"}


def show(t, indent=0):
    """Print the graph below t: each op, then its inputs, one level deeper."""
    label = names.get(id(t), "")
    if t.grad_fn is None:
        print(" " * indent + f"leaf {label} = {t.item():.4g}")
        return
    print(" " * indent + f"{t.grad_fn.name}  -> {t.item():.4g}")
    for inp in t.grad_fn.inputs:
        if inp is not None:
            show(inp, indent + 4)


show(f)

# %% [markdown]
# `viz.draw_graph` draws the same graph, output at the bottom: square boxes are ops (with the shape they
# produce), rounded boxes are leaves (orange when they require a gradient). Notice that `a` has **two** arrows
# leaving it: it feeds the multiply inside `u` and the final multiply.

# %% tags=["thumbnail"]
viz.draw_graph(f, names={id(a): "a", id(b): "b", id(c): "c"}, title="f = tanh(a*b + c) * a")

# %% [markdown]
# ## 2. The chain rule by hand
#
# Write the expression as a chain of simple steps, each with a *local* derivative that is easy to write down:
#
# | step | value | local derivative |
# |---|---|---|
# | $u = a\,b + c$ | 4 | $\partial u/\partial a = b,\ \partial u/\partial b = a,\ \partial u/\partial c = 1$ |
# | $t = \tanh u$ | 0.99933 | $\partial t/\partial u = 1 - t^2$ |
# | $f = t\,a$ | 1.99866 | $\partial f/\partial t = a,\ \partial f/\partial a = t$ |
#
# The chain rule says: the derivative of $f$ with respect to an input is the **sum over every path** from $f$ to
# that input of the **product of the local derivatives** along the path. `c` and `b` each have one path. `a` has
# two, and forgetting the second one is the classic autograd bug:
#
# $$\frac{\partial f}{\partial a} = \underbrace{t}_{\text{direct}} + \underbrace{a\,(1-t^2)\,b}_{\text{through } u}$$

# %%
t = np.tanh(4.0)
df_dc = 2.0 * (1 - t**2) * 1.0
df_db = 2.0 * (1 - t**2) * 2.0
df_da = t + 2.0 * (1 - t**2) * (-3.0)
print(f"by hand: df/da = {df_da:.6f}   df/db = {df_db:.6f}   df/dc = {df_dc:.6f}")

# %% [markdown]
# Now let the engine do it. `f.backward()` seeds $\partial f/\partial f = 1$, visits the nodes outputs-first
# (a topological order), calls each op's `backward(ctx, grad)` to turn the gradient of its output into gradients of
# its inputs, and **adds** the gradients that arrive at the same tensor from different paths.

# %%
f.backward()
exercises.check_grad("df/da", df_da, a.grad, rtol=1e-5)
exercises.check_grad("df/db", df_db, b.grad, rtol=1e-5)
exercises.check_grad("df/dc", df_dc, c.grad, rtol=1e-5)

# %% [markdown]
# `check_grad` is the checker you will use in the exercises: **exact** means bit-for-bit equal, **approx** means
# equal up to rounding, **maxdiff** is the largest absolute difference. Float32 arithmetic in the engine against
# float64 arithmetic by hand gives `approx: True` but not `exact`.
#
# ## 3. Each op is one small `Function`
#
# The multiply above is `minglm.ops.Mul`: a `forward` that computes with NumPy and saves what it needs, and a
# `backward` that returns one gradient per input. Here is how little it takes to add an op of our own, a square:

# %%
class Square(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.x = x  # saved for backward
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return (grad * 2.0 * ctx.x,)  # d(x²)/dx = 2x, times the gradient arriving from above


x = minglm.Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
y = Square.apply(x).sum()
y.backward()
print("x.grad =", x.grad, " (expected 2x =", 2 * x.numpy(), ")")

# %% [markdown]
# ### Broadcasting is undone in one place
#
# When a `(3,)` bias is added to a `(2, 3)` matrix, NumPy silently repeats the bias for each row. Its gradient must
# therefore be the **sum** over those rows, so that it has the bias' own shape again. No op's backward deals with
# this: the engine's `_unbroadcast` sums every incoming gradient back to its input's shape, in exactly one place.

# %%
X = minglm.Tensor(rng.standard_normal((2, 3)), requires_grad=True)
bias = minglm.Tensor(np.zeros(3), requires_grad=True)
(X + bias).sum().backward()
print("bias.grad =", bias.grad, "shape", bias.grad.shape, "(each entry was used twice)")

# %% [markdown]
# ### Gradients accumulate
#
# A leaf's `.grad` is *added to* by every `backward()` until you reset it. This is what lets a reused weight
# collect the gradient of every use, and it is also why a training loop calls `zero_grad()` before each step.

# %%
w = minglm.Tensor(3.0, requires_grad=True)
for _ in range(2):
    (w * w).backward()
    print("after a backward: w.grad =", w.grad)
w.zero_grad()
print("after zero_grad(): w.grad =", w.grad)

# %% [markdown]
# ## 4. Checking a gradient with finite differences
#
# The definition of the derivative gives a way to check any backward without knowing how it was derived:
#
# $$f'(x) \approx \frac{f(x+\varepsilon) - f(x-\varepsilon)}{2\varepsilon}$$
#
# This *central* difference has an error of order $\varepsilon^2$ from the curvature of $f$ (truncation), but
# dividing by a tiny $\varepsilon$ also magnifies the rounding error of $f$ itself, of order
# $\text{machine eps}/\varepsilon$. The plot shows the two fighting for $\tanh$ at $x = 0.7$.

# %%
x0 = 0.7
exact = 1 - np.tanh(x0) ** 2
eps = np.logspace(-12, 0, 49)
fig, ax = plt.subplots(figsize=(6, 3.5))
for dtype in (np.float64, np.float32):
    xs = np.asarray(x0, dtype=dtype)
    e = eps.astype(dtype)
    numeric = (np.tanh(xs + e) - np.tanh(xs - e)) / (2 * e)
    err = np.abs(numeric.astype(np.float64) - exact)
    ax.loglog(eps, np.maximum(err, 1e-17), marker=".", label=np.dtype(dtype).name)
    best = int(np.argmin(err))
    print(f"{np.dtype(dtype).name}: smallest error {err[best]:.1e} at ε = {eps[best]:.0e}")
ax.axvline(1e-6, color="gray", ls="--", lw=1)
ax.set_xlabel("ε")
ax.set_ylabel("|central difference − exact|")
ax.set_title("Finite-difference error of d tanh/dx at 0.7")
ax.legend()
plt.show()

# %% [markdown]
# Left of the dip, rounding wins; right of it, truncation (a slope of 2: ten times smaller ε, a hundred times
# smaller error). In float64 the dip sits near $\varepsilon = 10^{-6}$ (the dashed line, `gradcheck`'s default)
# with an error around $10^{-12}$. In float32 the best error is a million times worse, and at $\varepsilon = 10^{-6}$
# the estimate is off in the second digit: far too coarse to catch a subtle bug. That is why
# `minglm.testing.gradcheck` insists on **float64** inputs.
#
# ## 5. `gradcheck`
#
# `gradcheck(fn, *inputs)` perturbs every element of every input that requires a gradient, one at a time, and
# compares the numeric derivative with what `backward()` says. Here it checks layer norm, the op we will meet again
# in every transformer layer:

# %%
x64 = minglm.Tensor(rng.standard_normal((2, 5)), requires_grad=True)  # NumPy's default is float64
w64 = minglm.Tensor(rng.standard_normal(5), requires_grad=True)
b64 = minglm.Tensor(rng.standard_normal(5), requires_grad=True)
print("layer_norm passes:", gradcheck(F.layer_norm, x64, w64, b64, name="layer_norm"))

# %% [markdown]
# And here is a broken op: a square whose author forgot the factor 2. `gradcheck` names the op, the input, the
# element and both numbers:

# %%
class SquareForgotTheTwo(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.x = x
        return x * x

    @staticmethod
    def backward(ctx, grad):
        return (grad * ctx.x,)  # wrong: d(x²)/dx is 2x


try:
    gradcheck(SquareForgotTheTwo.apply, minglm.Tensor(rng.standard_normal(4), requires_grad=True), name="square")
except GradcheckError as err:
    print("caught:", err)

# %% [markdown]
# ### Why the upstream gradient must be random
#
# `gradcheck` does not check `fn(x).sum()`: it contracts the output with a **random** upstream gradient $G$.
# The reason is softmax. Its outputs always add up to 1, so the gradient of `softmax(x).sum()` is exactly zero —
# and so is the gradient of many *wrong* backwards. Below, a softmax whose backward subtracts the plain mean of the
# upstream gradient (instead of its $y$-weighted sum) passes a check with $G = 1$ and fails with a random $G$.


# %%
class SoftmaxWrongBackward(Function):
    @staticmethod
    def forward(ctx, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        ctx.y = e / e.sum(axis=-1, keepdims=True)
        return ctx.y

    @staticmethod
    def backward(ctx, grad):
        y = ctx.y
        return (y * (grad - grad.mean(axis=-1, keepdims=True)),)  # should be (grad * y).sum(...)


xs = minglm.Tensor(rng.standard_normal((3, 4)), requires_grad=True)
print("upstream G = 1:     ", gradcheck(SoftmaxWrongBackward.apply, xs, upstream=[np.ones((3, 4))], name="softmax"))
try:
    gradcheck(SoftmaxWrongBackward.apply, xs, name="softmax")
except GradcheckError as err:
    print("upstream G random:  caught:", err)

# %% [markdown]
# ## Summary
#
# - A `Tensor` wraps an array; every op on tensors records a `Function` node (`grad_fn`) with its `inputs`.
# - `backward()` walks that graph outputs-first and applies the **chain rule**: local derivatives multiply along a
#   path, and the contributions of different paths (a reused tensor, a broadcast) **add up**.
# - Each op is one small `Function` with a `forward` and a `backward`; broadcasting is undone once, by the engine.
# - Leaf gradients accumulate until `zero_grad()`.
# - **gradcheck** compares every element of a backward with float64 central differences under a random upstream
#   gradient. Every op in minglm passes it, which is why the rest of the course can trust its gradients.
#
# ## Exercises
#
# Each exercise has a checker in `minglm.exercises` that prints `exact / approx / maxdiff` for every gradient you
# derive, then PASS or FAIL. Replace `return None` with your answer and run the cell. Use NumPy only, not the
# engine: the point is to derive each gradient yourself.
#
# **1.** For arrays `a, b, c` and $f = \tanh(a \cdot b + c) \cdot a$ (elementwise), let $L = \sum G \odot f$.
# Return $\partial L/\partial a$, $\partial L/\partial b$, $\partial L/\partial c$.

# %%
def chain_rule(a, b, c, G):
    # your code here: return da, db, dc
    return None


exercises.check_chain_rule(chain_rule)

# %% [markdown]
# **2.** Softmax backward. With $y = \mathrm{softmax}(x)$ over the last axis and upstream gradient $dy$, derive
# $dx$ using only $y$ and $dy$. Hint: $\partial y_i/\partial x_j = y_i(\delta_{ij} - y_j)$; you never need to
# build the Jacobian.

# %%
def softmax_backward(y, dy):
    # your code here: return dx
    return None


exercises.check_softmax_backward(softmax_backward)

# %% [markdown]
# **3.** Layer-norm backward (the llm.c exercise). With $\hat x = (x - \mu)/\sqrt{\sigma^2 + \varepsilon}$ over
# the last axis and $\text{out} = \hat x \, w + b$, return $dx$, $dw$, $db$ for `x` of shape (B, T, C).
# Hint: write $g = dout \cdot w$ and use that $\hat x$ has mean 0 and mean square about 1.

# %%
def layernorm_backward(dout, x, w, eps):
    # your code here: return dx, dw, db
    return None


exercises.check_layernorm_backward(layernorm_backward)

# %% [markdown]
# **4.** (Think.) A second `f.backward()` on the graph of section 1 raises an error instead of returning numbers.
# Read `Tensor.backward` in `minglm/tensor.py`: what was freed, and why would silently re-using it be worse than
# an error?
