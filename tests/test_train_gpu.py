"""The same run on the CPU (NumPy) and the GPU (CuPy): losses agree to 1e-4 relative over 20 steps.

Marked gpu, and skipped without CuPy and a CUDA device. The data, the initial weights and the dropout masks all come
from the one NumPy Generator, so both devices see exactly the same batches; only float32 rounding (and the fused
attention kernel on the GPU instead of the plain path) can differ.
"""

import json

import numpy as np
import pytest

from minglm import backend
from minglm.commands.train import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA GPU"),
]


def _losses(run_dir):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)])


def test_cpu_and_gpu_losses_agree_over_20_steps(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["thou", "art", "fair", "and", "kind", "my", "lord", "the", "sea", "night", "doth", "love"]
    for i in range(3):
        text = "\n".join(" ".join(rng.choice(words, 9)).capitalize() + "." for _ in range(150))
        (corpus / f"doc{i}.txt").write_text(text, encoding="utf-8")
    common = ["--corpus", str(corpus), "--out", str(tmp_path), "--steps", "20", "--seed", "7",
              "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
              "--set", "model.dropout=0.1", "--set", "seq_len=64", "--set", "batch_size=4",
              "--set", "eval_batches=1", "--set", "fill_lines=1", "--set", "plots=false",
              "--eval-every", "20", "--ckpt-every", "20", "--quiet"]
    assert main([*common, "--name", "cpu", "--device", "cpu"]) == 0
    assert main([*common, "--name", "gpu", "--device", "gpu"]) == 0
    cpu, gpu = _losses(tmp_path / "cpu"), _losses(tmp_path / "gpu")
    assert len(cpu) == len(gpu) == 20
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4)
