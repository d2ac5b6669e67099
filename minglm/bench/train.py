"""Benchmark: one GLM training step (forward + backward + AdamW) in minglm, and the same model in PyTorch eager.

Configs (docs/performance.md): ``tiny`` (4 layers, d 128, 4 heads, seq 128) and ``small`` (4 layers, d 256, 8 heads,
seq 256), batch 8, vocabulary 256, random tokens with a GLM ``sep`` of T/2 per sample. Reported per config:
ms/step (median of ``--steps`` timed steps after a warm-up), tokens/s, achieved GFLOP/s, and the peak memory of one
step (``tracemalloc``, which NumPy reports its buffers to). When torch is importable, the same architecture is
written below in PyTorch (``TorchGLM``), loaded with minglm's weights, checked to give the same loss, and timed
on the same batch with ``torch.set_num_threads``; the table then shows minglm / torch. The two frameworks run in
alternating blocks of steps, so load from other processes hits both alike. Target: ratio <= 1.2 on ``small``.

FLOPs (exact count of the matrix products, multiply-add = 2): per layer, forward, with N = B·T tokens,
    QKV 2·N·C·3C + attention out 2·N·C·C + MLP 2·(2·N·C·4C) = 24·N·C²,   scores q·kᵀ and probs·v: 2·(2·B·T²·C);
plus the tied head 2·N·C·V. Backward does two products per forward product, so a step is 3× the forward.
(small: 39.5 GFLOP dense + 6.4 attention = 46 GFLOP.) Elementwise work is not counted.

``--profile`` times every op's forward and backward by name (it wraps each Function), so the hotspots read off
directly; the rest of the step is Python and engine bookkeeping.

The "NumPy first" column is a notebook's case: a separate Python process whose first line is ``import numpy``, which
then imports minglm, builds the same GLM through the public API and trains it on the same batch (``NUMPY_FIRST``).
Its blocks of steps alternate with the others, and it must match this process's speed (within 5 %): whatever
process-wide tuning the speed needs happens at ``import minglm`` (``backend.tune_process``), not by import order.
``--no-numpy-first`` skips it.

BLAS threads are fixed when NumPy is first imported: run as ``OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python -m
minglm bench train`` (the table prints what NumPy got). minglm's own threads for the non-GEMM passes
(``minglm.parallel``) follow the BLAS count; ``MINGLM_THREADS=1`` shows the step without them.

Left out: data loading (see ``bench data``), dropout (0 in the course configs), and the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict

import numpy as np

import minglm.functional as F
from minglm import backend, parallel
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW
from minglm.tensor import Function

CONFIGS = {"tiny": dict(batch=8), "small": dict(batch=8)}


def step_flops(cfg: GLMConfig, B: int, T: int) -> tuple[float, float]:
    """(dense GEMM FLOPs, attention GEMM FLOPs) of one forward + backward; see the module docstring."""
    N, C, L, V = B * T, cfg.d_model, cfg.n_layer, cfg.vocab_size
    dense = L * 24 * N * C * C + 2 * N * C * V
    attention = L * 4 * B * T * T * C
    return 3.0 * dense, 3.0 * attention


def make_batch(cfg: GLMConfig, B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sep = T // 2
    pos = np.tile(np.arange(T), (B, 1))
    pos[:, sep:] = sep - 1  # Part B reuses the mask's position, as in GLM
    block = np.zeros((B, T), dtype=np.int64)
    block[:, sep:] = np.arange(1, T - sep + 1)
    mask = np.zeros((B, T), dtype=np.float32)
    mask[:, sep:] = 1.0
    return dict(tokens=rng.integers(0, cfg.vocab_size, (B, T)), position_ids=pos, block_position_ids=block,
                sep=np.full(B, sep), targets=rng.integers(0, cfg.vocab_size, (B, T)), loss_mask=mask)


class MinglmStep:
    """zero_grad → forward → loss → backward → AdamW step (when minglm.optim.AdamW exists)."""

    def __init__(self, cfg: GLMConfig, batch: dict, seed: int = 0):
        self.model = GLM(cfg, np.random.default_rng(seed))
        self.batch = batch
        self.weights = self.model.state_dict()  # before the optimizer changes them, for the torch twin
        self.opt = AdamW(self.model, lr=1e-4)

    def __call__(self) -> float:
        b = self.batch
        self.opt.zero_grad()
        logits = self.model(b["tokens"], b["position_ids"], b["block_position_ids"], b["sep"])
        loss = F.cross_entropy(logits, b["targets"], b["loss_mask"])
        loss.backward()
        self.opt.step()
        return loss.item()


def torch_twin(cfg: GLMConfig, weights: dict, batch: dict, threads: int):
    """The same GLM in PyTorch eager (SDPA with a boolean GLM mask), loaded with minglm's weights."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as TF

    torch.set_num_threads(threads)
    C, nh = cfg.d_model, cfg.n_head

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = tnn.LayerNorm(C, eps=cfg.layernorm_eps)
            self.query_key_value = tnn.Linear(C, 3 * C)
            self.dense = tnn.Linear(C, C)
            self.post_attention_layernorm = tnn.LayerNorm(C, eps=cfg.layernorm_eps)
            self.dense_h_to_4h = tnn.Linear(C, 4 * C)
            self.dense_4h_to_h = tnn.Linear(4 * C, C)

        def forward(self, x, mask, B, T):
            qkv = self.query_key_value(self.input_layernorm(x)).view(B, T, 3, nh, C // nh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
            y = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.dense(y.transpose(1, 2).reshape(B * T, C))
            h = TF.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x)), approximate="tanh")
            return x + self.dense_4h_to_h(h)

    class TorchGLM(tnn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = tnn.Embedding(cfg.vocab_size, C)
            self.position_embeddings = tnn.Embedding(cfg.max_len + 1, C)
            self.block_position_embeddings = tnn.Embedding(cfg.max_len + 1, C)
            self.layers = tnn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.final_layernorm = tnn.LayerNorm(C, eps=cfg.layernorm_eps)

        def forward(self, tokens, pos, block, mask):
            B, T = tokens.shape
            x = self.word_embeddings(tokens) + self.position_embeddings(pos) + self.block_position_embeddings(block)
            x = x.view(B * T, C)
            for layer in self.layers:
                x = layer(x, mask, B, T)
            return TF.linear(self.final_layernorm(x), self.word_embeddings.weight)  # (N, V)

    model = TorchGLM()
    ours = {}
    for name, value in weights.items():  # minglm names -> this module's names (the sub-module level differs)
        name = name.replace("attention.", "").replace("mlp.", "")
        ours[name] = torch.from_numpy(value.copy())
    model.load_state_dict(ours, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    T = t["tokens"].shape[1]
    j = torch.arange(T)
    mask = (j[None, None, None, :] < t["sep"][:, None, None, None]) | (j[None, None, None, :] <= j[None, None, :, None])
    targets, weights_mask = t["targets"].reshape(-1), t["loss_mask"].reshape(-1)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(t["tokens"], t["position_ids"], t["block_position_ids"], mask)
        nll = TF.cross_entropy(logits, targets, reduction="none")
        loss = (nll * weights_mask).sum() / weights_mask.sum()
        loss.backward()
        opt.step()
        return loss.item()

    return step


# A notebook's order: NumPy (and with it OpenBLAS) is loaded before minglm. Run with ``python -c`` so that nothing of
# minglm is imported before the first line; prints one JSON line of per-step wall and CPU seconds.
NUMPY_FIRST = """
import numpy as np
import json, sys, time
import minglm
import minglm.functional as F
from minglm.model import GLM, GLMConfig
from minglm.optim import AdamW
from minglm.bench.train import make_batch

name, B, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = GLMConfig.preset(name, vocab_size=256)
b = make_batch(cfg, B, cfg.seq_len)
model = GLM(cfg, np.random.default_rng(0))
opt = AdamW(model, lr=1e-4)
wall, cpu = [], []
for i in range(steps + 2):  # two untimed steps first, as the other blocks get
    c0, t0 = time.process_time(), time.perf_counter()
    opt.zero_grad()
    logits = model(b["tokens"], b["position_ids"], b["block_position_ids"], b["sep"])
    loss = F.cross_entropy(logits, b["targets"], b["loss_mask"])
    loss.backward()
    opt.step()
    if i >= 2:
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
print(json.dumps({"wall": wall, "cpu": cpu, "tuning": minglm.backend.tuning()}))
"""


def numpy_first_block(name: str, batch_size: int, steps: int) -> dict:
    """Run ``NUMPY_FIRST`` in a fresh process (same environment and threads) and return its timings."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the folder above minglm/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", NUMPY_FIRST, name, str(batch_size), str(steps)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_bytes(fn) -> int:
    """Peak traced allocation of one call of ``fn`` (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class OpTimer:
    """Wrap every Function's forward and backward with a timer (for --profile); ``restore()`` undoes it."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.saved = []
        todo = list(Function.__subclasses__())
        classes = []
        while todo:
            cls = todo.pop()
            classes.append(cls)
            todo.extend(cls.__subclasses__())
        for cls in classes:
            for kind in ("forward", "backward"):
                if kind in cls.__dict__:
                    orig = cls.__dict__[kind]
                    self.saved.append((cls, kind, orig))
                    setattr(cls, kind, staticmethod(self._wrap(f"{cls.__name__}.{kind}", orig.__func__)))

    def _wrap(self, key: str, fn):
        totals = self.totals

        def timed(*args, **kwargs):
            t0 = time.perf_counter()  # wall time: an op may run on several threads (minglm.parallel)
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - t0

        return timed

    def restore(self) -> None:
        for cls, kind, orig in self.saved:
            setattr(cls, kind, orig)


def _median_times(fns: dict, steps: int, rounds: int = 2, numpy_first=None) -> dict[str, float]:
    """Median wall and CPU seconds per step of each step function (and of the ``numpy_first`` process, when given:
    a callable that runs one block of steps elsewhere and returns their times).

    The frameworks run in alternating blocks (``rounds`` blocks of ``steps`` steps each), not step by step: both
    thread pools (OpenBLAS, PyTorch's OpenMP) spin for a while after each call, and on 2 cores the other pool's
    spinning would be charged to whoever runs next. CPU time (``time.process_time``, all threads of this process) is
    the steadier number on a shared machine: other processes stretch the wall time but not the work done here.
    """
    names = list(fns) + (["numpy_first"] if numpy_first is not None else [])
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for _ in range(rounds):
        if numpy_first is not None:
            block = numpy_first(steps)
            wall["numpy_first"] += block["wall"]
            cpu["numpy_first"] += block["cpu"]
        for name, fn in fns.items():
            fn()  # one untimed step: let the other pool's threads go to sleep
            for _ in range(steps):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    out = {f"s_{k}": float(np.median(v)) for k, v in wall.items()}
    out.update({f"cpu_{k}": float(np.median(v)) for k, v in cpu.items()})
    return out


def run_config(name: str, steps: int, threads: int, use_torch: bool, profile: bool, batch_size: int | None = None,
               rounds: int = 2, numpy_first: bool = False) -> dict:
    cfg = GLMConfig.preset(name, vocab_size=256)
    B, T = batch_size or CONFIGS[name]["batch"], cfg.seq_len
    batch = make_batch(cfg, B, T)
    ours = MinglmStep(cfg, batch)
    fns = {"minglm": ours}
    result = {"config": name, "B": B, "T": T, "params": ours.model.num_parameters()}
    if use_torch:
        theirs = torch_twin(cfg, ours.weights, batch, threads)
        l_ours, l_theirs = ours(), theirs()  # the first step (from identical weights) gives the same loss
        result["loss_diff"] = abs(l_ours - l_theirs)
        fns["torch"] = theirs
    for fn in fns.values():  # warm-up
        fn()
    result["peak_mb"] = peak_bytes(ours) / 2**20
    dense, attention = step_flops(cfg, B, T)
    result["gflop"] = (dense + attention) / 1e9
    child = (lambda n: numpy_first_block(name, B, n)) if numpy_first else None
    result.update(_median_times(fns, steps, rounds, child))
    if profile:
        timer = OpTimer()
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                ours()
            total = (time.perf_counter() - t0) / steps
        finally:
            timer.restore()
        result["profile"] = (total, {k: v / steps for k, v in timer.totals.items()})
    return result


def _blas_threads() -> str:
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "unset (BLAS uses all cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minglm bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of --steps steps per framework")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (NumPy: set OMP_NUM_THREADS)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--profile", action="store_true", help="time every op's forward and backward")
    parser.add_argument("--no-numpy-first", action="store_true",
                        help="skip the column of a process that imports NumPy before minglm (a notebook's order)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--steps, --rounds and --batch must be >= 1")
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("(torch is not importable: minglm only)")
            use_torch = False

    print(f"CPU: {backend.cpu_name()}; load average {os.getloadavg()[0]:.1f}; BLAS threads: {_blas_threads()}; "
          f"minglm threads: {parallel.num_threads()}; process tuning: {backend.tuning() or 'off (MINGLM_TUNE=0)'}")
    numpy_first = not args.no_numpy_first
    header = (f"{'config':7} {'params':>9} {'B×T':>8} {'GFLOP':>6} {'ms/step':>8} {'CPU ms':>8} {'tok/s':>8} "
              f"{'GFLOP/s':>8} {'peak MB':>8}")
    if numpy_first:
        header += f" {'NumPy-first ms':>14} {'vs ms':>6}"
    if use_torch:
        header += f" {'torch ms':>9} {'ratio':>6} {'CPU ratio':>9} {'|Δloss|':>8}"
    print(header)
    results = []
    for name in args.configs:
        r = run_config(name, args.steps, args.threads, use_torch, args.profile, args.batch, args.rounds, numpy_first)
        results.append(r)
        s = r["s_minglm"]
        line = (f"{name:7} {r['params']:>9,} {r['B']}×{r['T']:<6} {r['gflop']:>6.1f} {s * 1e3:>8.1f} "
                f"{r['cpu_minglm'] * 1e3:>8.1f} "
                f"{r['B'] * r['T'] / s:>8.0f} {r['gflop'] / s:>8.1f} {r['peak_mb']:>8.1f}")
        if numpy_first:
            line += f" {r['s_numpy_first'] * 1e3:>14.1f} {r['s_numpy_first'] / s:>6.2f}"
        if use_torch:
            line += (f" {r['s_torch'] * 1e3:>9.1f} {s / r['s_torch']:>6.2f} {r['cpu_minglm'] / r['cpu_torch']:>9.2f}"
                     f" {r['loss_diff']:>8.1e}")
        print(line)
    for r in results:
        if "profile" not in r:
            continue
        total, ops = r["profile"]
        print(f"\nprofile of {r['config']}: {total * 1e3:.1f} ms/step (wall ms per step, by op)")
        for key, sec in sorted(ops.items(), key=lambda kv: -kv[1])[:18]:
            print(f"  {key:28} {sec * 1e3:8.1f}  {100 * sec / total:5.1f} %")
        rest = total - sum(ops.values())
        print(f"  {'(everything else)':28} {rest * 1e3:8.1f}  {100 * rest / total:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
