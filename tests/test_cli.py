"""The `python -m minglm` dispatcher and the small commands it owns: sample and export."""

import numpy as np

from minglm import interop
from minglm.commands import main
from minglm.runs import load_run


def test_usage_and_unknown_command(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert main(["bench", "nonsense"]) == 2


def test_sample_prints_part_a_part_b_positions(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    assert main(["sample", "--corpus", str(tmp_path), "--seq-len", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("Part A:", "Part B[0]", "pos", "block", "sep (Part A length)"):
        assert word in out


def test_export_writes_official_names_that_load_back(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["thou", "art", "fair", "and", "kind", "my", "lord", "the", "sea", "night"]
    for i in range(3):  # the split is by document, so validation needs one of them
        text = "\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(100))
        (corpus / f"doc{i}.txt").write_text(text, encoding="utf-8")
    args = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(tmp_path), "--name", "r", "--steps", "2",
            "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
            "--set", "seq_len=32", "--set", "batch_size=2", "--set", "eval_batches=1", "--set", "fill_lines=1",
            "--set", "plots=false", "--eval-every", "2", "--ckpt-every", "2", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "official.npz"
    assert main(["export", str(tmp_path / "r"), "--out", str(out)]) == 0
    weights = interop.load_npz(out)
    assert "word_embeddings.weight" in weights and "transformer.final_layernorm.bias" in weights
    assert interop.detect_layout(weights) == "official"
    model, _ = load_run(tmp_path / "r")
    before = {k: v.copy() for k, v in model.state_dict().items()}
    interop.load(model, out)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_export_of_an_unknown_run_says_so(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "no such run" in capsys.readouterr().err
