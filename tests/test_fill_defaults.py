"""Fill defaults a student can trust: repetition controls on hand-made logits, spaces around a blank, greedy by
default in the command, and the one-line warnings (untrained blank types, unknown characters)."""

from __future__ import annotations

import numpy as np
import pytest

from minglm import generate as G
from minglm.commands import fill as fill_command
from minglm.model import GLM, GLMConfig
from minglm.runs import save_run
from minglm.tokenizer import CharTokenizer

TOK = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz .,!"])
MODEL = GLM(GLMConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, d_model=16, max_len=64),
            np.random.default_rng(0))


class Scripted:
    """A decoder whose step logits come from a list of hand-made (V,) arrays."""

    def __init__(self, rows):
        self.rows = list(rows)

    def prefill(self, ids):
        return np.zeros((len(ids), TOK.vocab_size), dtype=np.float32)

    def step(self, token, pos, block):
        return self.rows.pop(0)


def logits_favouring(*order):
    """(V,) logits whose best token is order[0], then order[1], ... (all others far below)."""
    z = np.full(TOK.vocab_size, -10.0, dtype=np.float32)
    for rank, tok in enumerate(order):
        z[tok] = 5.0 - rank
    return z


def test_repetition_penalty_on_hand_made_logits():
    z = np.array([2.0, 1.0, -1.0, 0.5])
    s = G.Sampling(greedy=True, repetition_penalty=4.0)
    out = G.repetition_controls(z, [0, 2], s)
    np.testing.assert_allclose(out, [0.5, 1.0, -4.0, 0.5])  # positive / p, negative * p, unseen untouched
    assert G.choose_token(z, s, None, [0, 2]) == 1 and G.choose_token(z, s, None) == 0
    assert G.repetition_controls(z, [0], G.Sampling()) is z  # off by default: the same array back


def test_no_repeat_ngram_on_hand_made_logits():
    z = np.array([3.0, 2.0, 1.0, 0.0])
    # history 0 1 0: the bigram (0, 1) occurred, so after the trailing 0 the token 1 is banned
    out = G.repetition_controls(z, [0, 1, 0], G.Sampling(no_repeat_ngram=2))
    assert out[1] == -np.inf and np.isfinite(out[[0, 2, 3]]).all()
    # unigram ban: every token seen so far
    out = G.repetition_controls(z, [0, 1], G.Sampling(no_repeat_ngram=1))
    assert np.isinf(out[[0, 1]]).all() and np.isfinite(out[[2, 3]]).all()
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        G.Sampling(no_repeat_ngram=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        G.Sampling(repetition_penalty=0.5)


def test_no_repeat_ngram_inside_a_fill():
    x, y = TOK.encode("x")[0], TOK.encode("y")[0]
    want = [x, y, x, y, x, y]  # a model stuck in a loop, with <eop> always second best

    def run(**kw):
        rows = [logits_favouring(w, TOK.eop_id) for w in want]
        return G.fill(MODEL, TOK, "a [MASK] b", G.Sampling(greedy=True, max_new_tokens=6, **kw),
                      decoder=lambda m, c: Scripted(rows))

    assert run().fills == ["xyxyxy"] and run().stop_reasons == ["max_new_tokens"]
    r = run(no_repeat_ngram=2)  # after x y x, the bigram (x, y) would repeat: <eop> wins
    assert r.fills == ["xyx"] and r.stop_reasons == ["eop"]
    assert run(repetition_penalty=100.0).fills == ["xy"]  # x then y are new; x again is pushed below <eop>


def test_space_before_a_blank_moves_into_the_fill_and_never_doubles():
    ctx, masks, _ = G.build_context(TOK, "a  [MASK] b")
    assert ctx.tolist() == [TOK.cls_id, *TOK.encode("a"), TOK.mask_id, *TOK.encode(" b"), TOK.eos_id]
    sp, x = TOK.encode(" ")[0], TOK.encode("x")[0]
    rows = [logits_favouring(sp), logits_favouring(x), logits_favouring(sp), logits_favouring(TOK.eop_id)]
    r = G.fill(MODEL, TOK, "a [MASK] b", G.Sampling(greedy=True, max_new_tokens=6),
               decoder=lambda m, c: Scripted(rows))
    assert r.fill_ids == [[sp, x, sp]] and r.fills == ["x"] and r.filled_text == "a x b"
    assert G.trim_fill(" x ", "a(", ")b") == " x " and G.trim_fill(" x", "", "") == "x"


@pytest.fixture
def run_dir(tmp_path):
    save_run(MODEL, TOK, tmp_path / "run", step=1)
    return tmp_path / "run"


def test_fill_command_is_greedy_by_default_and_help_shows_defaults(run_dir, capsys):
    assert fill_command.main([str(run_dir), "ab [MASK] cd", "--max-len", "4"]) == 0
    first = capsys.readouterr().out
    assert fill_command.main([str(run_dir), "ab [MASK] cd", "--max-len", "4", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first  # greedy: the seed changes nothing
    with pytest.raises(SystemExit):
        fill_command.main(["--help"])
    helptext = capsys.readouterr().out
    for flag in ("--sample", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--no-repeat-ngram",
                 "--beams"):
        assert flag in helptext
    assert "default: 1.0" in helptext and "default: 0" in helptext


def test_fill_command_searches_4_beams_unless_told_otherwise(run_dir, capsys, monkeypatch):
    seen = []
    real = fill_command.fill
    monkeypatch.setattr(fill_command, "fill", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    for extra in ([], ["--greedy"], ["--beams", "1"], ["--beams", "2"], ["--sample"], ["--steps"]):
        assert fill_command.main([str(run_dir), "ab [MASK] cd", "--max-len", "4", *extra]) == 0
    assert [s.beams for s in seen] == [4, 1, 1, 2, 1, 1] and [s.greedy for s in seen] == [True] * 4 + [False, True]
    with pytest.raises(SystemExit):
        fill_command.main([str(run_dir), "ab [MASK] cd", "--sample", "--beams", "3"])


def test_fill_command_warns_about_untrained_blank_types_and_unknown_characters(run_dir, capsys):
    assert fill_command.main([str(run_dir), "ab [sMASK] cd", "--max-len", "2"]) == 0
    err = capsys.readouterr().err
    assert "[sMASK]" in err and "never trained" in err
    assert fill_command.main([str(run_dir), "ab [MASK] cd QQ€", "--max-len", "2"]) == 0
    err = capsys.readouterr().err
    assert "3 characters" in err and "[UNK]" in err
    assert fill_command.main([str(run_dir), "ab [MASK] cd", "--max-len", "2"]) == 0
    assert "warning" not in capsys.readouterr().err
