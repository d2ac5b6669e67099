"""The fill benchmark (minglm/fill_eval.py): the blank set, the two counting baselines and the scores."""

import numpy as np
import pytest

from minglm import fill_eval as fe

LINES = [
    "The king is dead and the queen is fled away tonight",
    "Give me thy hand and I will lead thee to the king",
    "What light through yonder window breaks upon the hill",
    "O Romeo, Romeo, wherefore art thou Romeo my love",
    "Now is the winter of our discontent made glorious",
    "To be or not to be that is the question we ask",
    "The quality of mercy is not strained but it droppeth",
    "All the world is a stage and all the men players",
]
VAL = ["\n".join(LINES[:4]), "\n".join(LINES[4:])]


def test_blank_set_is_fixed_by_its_seed_and_cuts_whole_words():
    a = fe.build_blank_set(VAL, n_word=4, n_span=3, seed=7)
    b = fe.build_blank_set(VAL, n_word=4, n_span=3, seed=7)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.kind for x in a] == ["word"] * 4 + ["span"] * 3
    for blank in a:
        line = blank.text.replace("[MASK]", blank.truth)
        assert line in LINES  # the blank and its truth give the line back
        assert len(fe.WORD_RE.findall(blank.truth)) == blank.n_words
        assert (blank.n_words == 1) == (blank.kind == "word") and 1 <= blank.n_words <= 4
        words = fe.WORD_RE.findall(line)
        i = [m.start() for m in fe.WORD_RE.finditer(line)].index(blank.text.index("[MASK]"))
        assert blank.left == (words[i - 1] if i else fe.BOS)
        assert blank.right == (words[i + blank.n_words] if i + blank.n_words < len(words) else fe.EOS)
    assert [x.text for x in fe.build_blank_set(VAL, 4, 3, seed=8)] != [x.text for x in a]


def test_blank_set_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="usable lines"):
        fe.build_blank_set(VAL, n_word=10, n_span=10)


def test_scores_known_values():
    assert fe.exact_match(" the ", "the") == 1.0 and fe.exact_match("The", "the") == 0.0
    assert fe.char_f1("abc", "abc") == 1.0 and fe.char_f1("xyz", "abc") == 0.0
    # "ab" vs "abcd": precision 1, recall 1/2 -> F1 2/3
    assert fe.char_f1("ab", "abcd") == pytest.approx(2 / 3)
    assert fe.char_f1("", "") == 1.0 and fe.char_f1("", "a") == 0.0
    blanks = [fe.Blank("[MASK] x", "to", "word", 1, fe.BOS, "x"), fe.Blank("a [MASK]", "to be", "span", 2, "a", fe.EOS)]
    s = fe.score(["to", "to"], blanks)
    assert s["word"] == {"n": 1, "exact": 1.0, "exact_se": 0.0, "f1": 1.0}
    assert s["span"]["exact"] == 0.0 and s["all"]["exact"] == 0.5
    assert s["all"]["exact_se"] == pytest.approx(0.5 / 2 ** 0.5)  # sqrt(0.5 * 0.5 / 2)


def test_paired_counts_and_standard_error():
    # 5 word blanks (truth "a".."e") and one span blank, which the word comparison leaves out
    blanks = [fe.Blank("[MASK]", t, "word", 1, fe.BOS, fe.EOS) for t in "abcde"]
    blanks.append(fe.Blank("[MASK]", "x y", "span", 2, fe.BOS, fe.EOS))
    model = ["a", "b", "c", "-", "-", "x y"]  # right on a, b, c
    ngram = ["a", "-", "-", "d", "-", "-"]  # right on a, d
    v = fe.paired(model, ngram, blanks)
    assert (v["n"], v["both"], v["first_only"], v["second_only"]) == (5, 1, 2, 1)
    assert v["diff"] == pytest.approx(1 / 5)
    # per-blank differences (0, 1, 1, -1, 0): the standard error of their sum over n, sqrt(b + c - (b - c)^2/n) / n
    d = np.array([0, 1, 1, -1, 0])
    assert v["diff_se"] == pytest.approx(np.sqrt(((d - d.mean()) ** 2).sum()) / 5)


def test_ngram_baseline_uses_both_sides_then_backs_off():
    train = ["the king is dead\nthe queen is dead\nthe king is dead\nthe king was here\na cat sat down"]
    blanks = [
        fe.Blank("The [MASK] is dead", "king", "word", 1, "The", "is"),  # (the, is): king 2, queen 1; case-blind
        fe.Blank("the [MASK] was here", "king", "word", 1, "the", "was"),
        fe.Blank("a [MASK] ran", "cat", "word", 1, "a", "ran"),  # only the left side was seen
        fe.Blank("zz [MASK] down", "sat", "word", 1, "zz", "down"),  # only the right side
        fe.Blank("zz [MASK] yy", "?", "word", 1, "zz", "yy"),  # neither: the most frequent word
        fe.Blank("[MASK] dead", "the king is", "span", 3, fe.BOS, "dead"),
    ]
    ngram = fe.NgramFiller(train, blanks)
    assert [ngram.fill(b) for b in blanks] == ["king", "king", "cat", "sat", "the", "the king is"]
    assert fe.most_frequent_word(train) == "the"


def test_evaluate_fill_ranks_the_model_and_is_deterministic():
    train = ["\n".join(LINES)]
    truths = [b.truth for b in fe.build_blank_set(VAL, 4, 3, seed=1)]
    perfect = fe.evaluate_fill(None, None, train, VAL, n_word=4, n_span=3, seed=1, preds=truths)
    assert perfect.rank == 1 and perfect.scores["model"]["word"]["exact"] == 1.0
    wrong = fe.evaluate_fill(None, None, train, VAL, n_word=4, n_span=3, seed=1, preds=["zzz"] * 7)
    assert wrong.rank == 3 or wrong.scores["most frequent"]["word"]["exact"] == 0.0
    assert wrong.scores["n-gram"] == perfect.scores["n-gram"]
    table = fe.format_report(perfect)
    assert "| model | 100.0 % ± 0.0" in table and "seed 1" in table and "rank on word blanks: 1 of 3" in table
    # the perfect model against the n-gram, blank by blank: it is right wherever the n-gram is
    v = perfect.vs_ngram
    assert v["n"] == 4 and v["second_only"] == 0 and v["both"] + v["first_only"] == 4
    assert f"model - n-gram on the same 4 one-word blanks: {100 * v['diff']:+.1f} ±" in table


def test_model_fills_through_generate(tiny_run_model):
    model, tokenizer = tiny_run_model
    blanks = fe.build_blank_set(VAL, 2, 1, seed=3)
    preds = fe.model_fills(model, tokenizer, blanks, max_new=5)
    assert len(preds) == 3 and all(isinstance(p, str) and p == p.strip() for p in preds)


@pytest.fixture
def tiny_run_model():
    from minglm.model import GLM, GLMConfig
    from minglm.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_texts(["\n".join(LINES)])
    config = GLMConfig.preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1, d_model=16, n_head=2)
    return GLM(config, np.random.default_rng(0)), tokenizer


def test_a_beam_row_sits_beside_the_greedy_model(tiny_run_model):
    model, tokenizer = tiny_run_model
    train = ["\n".join(LINES)]
    report = fe.evaluate_fill(model, tokenizer, train, VAL, n_word=2, n_span=1, seed=3, max_new=5, beams=3)
    assert list(report.scores) == ["model", "model, 3 beams", "n-gram", "most frequent"]
    assert all("model, 3 beams" in ex for ex in report.examples)
    beam = fe.model_fills(model, tokenizer, fe.build_blank_set(VAL, 2, 1, seed=3), max_new=5, beams=3)
    assert report.scores["model, 3 beams"] == fe.score(beam, fe.build_blank_set(VAL, 2, 1, seed=3))
    table = fe.format_report(report)
    assert "| model, 3 beams |" in table and "rank on word blanks" in table
