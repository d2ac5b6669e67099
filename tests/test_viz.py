"""Tests of the visualizer (viz/): every plot draws headless and shows the right thing.

The known answer is docs/figure2.md: the mask image of the Figure-2 sample must have exactly the §5 cells
visible, and the position rows must print the §1 / §2 numbers. Every figure is really drawn
(`savefig(BytesIO)`), since a Figure that is never rendered hides layout and font errors.
"""

from __future__ import annotations

import io
import json
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from known_answers import FIG2_MASK  # noqa: E402 - docs/figure2.md §5, typed once
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import viz  # noqa: E402
from minglm.commands.plot import main as cli_main  # noqa: E402
from minglm.data import collate, dense_mask  # noqa: E402
from minglm.tokenizer import CharTokenizer  # noqa: E402
from viz import style  # noqa: E402
from viz.curves import ema, split_rollbacks  # noqa: E402
from viz.graph import _layout, build_graph, longest_path_layers  # noqa: E402
from viz.infill import reconstruct  # noqa: E402
from viz.masks import PAD_CODE  # noqa: E402

FIG2_LABELS = ["x1", "x2", "[M]", "x4", "[M]", "[S]", "x5", "x6", "[S]", "x3"]


def draw(fig) -> Figure:
    assert isinstance(fig, Figure)
    fig.savefig(io.BytesIO(), format="png")
    return fig


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


# -- attention mask ---------------------------------------------------------------------------------------------

def test_figure2_mask_cells_match_reference():
    sample, names = viz.figure2_sample()
    fig = draw(viz.plot_attention_mask(sample, tokenizer=names))
    ax = fig.axes[0]
    image = ax.images[0]
    codes = np.asarray(image.get_array())
    assert codes.shape == (10, 10)
    np.testing.assert_array_equal(codes > 0, FIG2_MASK)
    assert tick_texts(ax.get_xticklabels()) == FIG2_LABELS
    assert tick_texts(ax.get_yticklabels()) == FIG2_LABELS
    assert "sep = 5" in ax.get_title()
    # colours: visible Part A keys are the Part A colour, hidden cells white, and the two spans differ
    rgba = image.to_rgba(codes)
    np.testing.assert_allclose(rgba[0, 0], to_rgba(style.PART_A_COLOR))
    np.testing.assert_allclose(rgba[0, 9], to_rgba(style.MASKED_COLOR))
    span_x5x6, span_x3 = rgba[9, 6], rgba[9, 9]  # keys x5 (2nd span in the text) and x3 (1st span)
    np.testing.assert_allclose(span_x3, to_rgba(style.span_color(0)))
    np.testing.assert_allclose(span_x5x6, to_rgba(style.span_color(1)))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("Part A") and "not visible" in legend[-1]


def test_figure2_with_cls_mask_is_the_12x12_reference():
    sample, names = viz.figure2_sample(with_cls=True)
    codes = np.asarray(draw(viz.plot_attention_mask(sample, tokenizer=names)).axes[0].images[0].get_array())
    r = np.arange(12)
    expected = (r[None, :] < 7) | (r[None, :] <= r[:, None])  # rows 0-6 see 0-6; row r >= 7 sees 0..r (figure2.md §5)
    np.testing.assert_array_equal(codes > 0, expected)


def test_mask_of_padded_batch_matches_dense_mask_and_marks_padding():
    a, _ = viz.figure2_sample()
    b, _ = viz.figure2_sample(with_cls=True)
    batch = collate([a, b])  # row 0 is padded from 10 to 12
    fig = draw(viz.plot_attention_mask(batch, i=0))
    codes = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_array_equal(codes > 0, dense_mask(batch)[0])
    assert codes[11, 10] == PAD_CODE and codes[11, 11] == PAD_CODE  # pad queries see pad keys (tril)
    assert np.all(codes[:10, 10:] == 0)  # no real token sees a pad
    assert tick_texts(fig.axes[0].get_xticklabels())[-1] == "[PAD]"
    with pytest.raises(ValueError, match="row i=5"):
        viz.plot_attention_mask(batch, i=5)


def test_long_mask_thins_labels_and_window_crops():
    batch, tok = viz.sample_from_text("a b c d e f g h " * 25, objective="glm-base", seed=1)
    T = batch.tokens.shape[1]
    fig = draw(viz.plot_attention_mask(batch, tokenizer=tok, max_labels=40))
    assert len(fig.axes[0].get_xticks()) <= 40 < T
    fig = draw(viz.plot_attention_mask(batch, tokenizer=tok, window=(10, 30)))
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (20, 20)
    with pytest.raises(ValueError, match="window"):
        viz.plot_attention_mask(batch, window=(30, 10))


def test_objective_masks_side_by_side():
    fig = draw(viz.plot_objective_masks())
    axes = [ax for ax in fig.axes if ax.images]
    names = [ax.get_xlabel() for ax in axes]  # each panel is named under it
    assert [t.split(" ")[0] for t in names] == ["BERT", "GPT", "Prefix", "T5", "GLM"]
    vis = [np.asarray(ax.images[0].get_array()) > 0 for ax in axes]
    assert vis[0].all()  # BERT: everything visible
    np.testing.assert_array_equal(vis[1], np.tril(np.ones((6, 6), bool)))  # GPT: causal
    np.testing.assert_array_equal(vis[4], FIG2_MASK)  # GLM: the docs/figure2.md §5 matrix
    assert tick_texts(axes[4].get_xticklabels()) == FIG2_LABELS
    assert tick_texts(axes[3].get_xticklabels())[:5] == ["x1", "x2", "<X0>", "x4", "<X1>"]


def test_objective_masks_from_the_data_module():
    from minglm.data import make_objective

    text = "Friends, Romans, countrymen"
    fig = draw(viz.plot_objective_masks(text=text, seed=1))
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_xlabel().split(" ")[0] for ax in axes] == ["BERT", "GPT", "Prefix", "T5", "GLM"]
    tok = CharTokenizer.from_texts([text])
    window = np.array([tok.cls_id] + tok.encode(text) + [tok.eos_id])
    for ax, name in zip(axes, ["bert", "gpt", "prefix", "t5", "glm-base"]):
        batch = make_objective(name, tok).make_batch([window], np.random.default_rng(1))
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()) > 0, dense_mask(batch)[0])


# -- positions and infilling --------------------------------------------------------------------------------------

def _row_numbers(ax, y: int) -> list[int]:
    texts = sorted((t.get_position()[0], t.get_text()) for t in ax.texts if t.get_position()[1] == y)
    return [int(s) for _, s in texts]


@pytest.mark.parametrize("convention, pos1", [("code", [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]),
                                              ("paper", [1, 2, 3, 4, 5, 5, 5, 5, 3, 3])])
def test_positions_print_the_reference_numbers(convention, pos1):
    sample, names = viz.figure2_sample()
    fig = draw(viz.plot_positions(sample, convention=convention, tokenizer=names))
    ax = fig.axes[0]
    assert _row_numbers(ax, 1) == pos1  # docs/figure2.md §1 / §2 Position 1
    assert _row_numbers(ax, 2) == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]  # Position 2
    assert tick_texts(ax.get_yticklabels()) == ["token", "Position 1", "Position 2", "target"]
    tokens = [t.get_text() for t in sorted(ax.texts, key=lambda t: t.get_position()[0]) if t.get_position()[1] == 0]
    assert tokens == FIG2_LABELS


def test_positions_paper_view_drops_cls():
    sample, names = viz.figure2_sample(with_cls=True)
    ax = draw(viz.plot_positions(sample, convention="paper", tokenizer=names)).axes[0]
    assert _row_numbers(ax, 1) == [1, 2, 3, 4, 5, 5, 5, 5, 3, 3]  # the code without [CLS] (docs/figure2.md §3)
    with pytest.raises(ValueError, match="convention"):
        viz.plot_positions(sample, convention="one-based")


def test_positions_wrap_long_rows():
    batch, tok = viz.sample_from_text("To be, or not to be, that is the question. " * 3, seed=0)
    fig = draw(viz.plot_positions(batch, tokenizer=tok, per_line=40))
    n = int(batch.lengths[0])
    assert len(fig.axes) == -(-n // 40)


def test_positions_keep_a_64_token_sample_on_one_readable_line():
    """A lesson's Shakespeare sample (up to 64 tokens) is one line, and its cells are narrow enough that a notebook
    scaling the figure to about 10 inches keeps the text at 6 pt or more."""
    batch, tok = viz.sample_from_text("In sooth, I know not why I am so sad: it wearies me", seed=0)
    n = int(batch.lengths[0])
    assert 40 < n <= 64
    fig = draw(viz.plot_positions(batch, tokenizer=tok))
    assert len(fig.axes) == 1
    width = fig.get_size_inches()[0]
    sizes = [t.get_fontsize() for t in fig.axes[0].texts if t.get_text().isdigit()]
    assert min(sizes) * min(1.0, 10.0 / width) >= 6.0, (n, width, min(sizes))


def test_blank_infilling_rows_and_reconstruction():
    sample, names = viz.figure2_sample()
    orig, owner = reconstruct(sample)
    np.testing.assert_array_equal(orig, np.arange(8, 14))
    np.testing.assert_array_equal(owner, [-1, -1, 0, -1, 1, 1])
    fig = draw(viz.plot_blank_infilling(sample, tokenizer=names))
    assert [ax.get_title(loc="left")[:3] for ax in fig.axes] == ["(a)", "(b)", "(c)"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["x1", "x2", "x3", "x4", "x5", "x6"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["x1", "x2", "[M]", "x4", "[M]"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["[S]", "x5", "x6", "[S]", "x3"]
    # the same span has the same colour in all three rows: x3 in (a), its [M] in (b), its piece in (c)
    faces = [[p.get_facecolor() for p in ax.patches] for ax in fig.axes]
    assert faces[0][2] == faces[1][2] == faces[2][3] == faces[2][4]
    assert faces[0][4] == faces[1][4] == faces[2][0] != faces[0][2]


def test_blank_infilling_refuses_baselines():
    batch, tok = viz.sample_from_text("To be, or not to be.", objective="gpt")
    with pytest.raises(ValueError, match="'gpt' baseline"):
        viz.plot_blank_infilling(batch, tok)


@pytest.mark.parametrize("mode", ["token", "sentence", "document"])
def test_every_glm_mode_reconstructs_the_text(mode):
    text = "Now is the winter of our discontent. Made glorious summer by this sun of York; and all the clouds."
    tok = CharTokenizer.from_texts([text])
    batch, _ = viz.sample_from_text(text, tok, objective="glm-10b", seed=3, mode=mode)
    orig, _ = reconstruct(batch)
    assert tok.decode(orig[1:-1]) == text  # [CLS] text <eos>
    draw(viz.plot_blank_infilling(batch, tok))
    draw(viz.plot_positions(batch, "paper", tok))


# -- span lengths ---------------------------------------------------------------------------------------------------

def test_span_lengths_against_truncated_poisson():
    from minglm.data import truncated_poisson_pmf

    fig = draw(viz.plot_span_lengths(n=300, rng=np.random.default_rng(0), seq_len=96))
    ax1, ax2 = fig.axes
    heights = np.array([p.get_height() for p in ax1.patches])
    assert abs(heights.sum() - 1.0) < 1e-9
    line = ax1.lines[0]
    np.testing.assert_allclose(line.get_ydata(), truncated_poisson_pmf(3.0, 39)[: len(line.get_ydata())])
    assert ax1.get_xlabel().startswith("span length") and "Mask ratio" in ax2.get_title()
    assert sum(p.get_height() for p in ax2.patches) == 300  # one ratio per sample


def test_span_lengths_from_arrays_and_bad_input():
    draw(viz.plot_span_lengths(np.array([1, 2, 2, 3, 5]), ratios=[0.15, 0.16]))
    with pytest.raises(ValueError, match="plot_span_lengths"):
        viz.plot_span_lengths(np.array([0, 2]))


# -- loss curves ----------------------------------------------------------------------------------------------------

def _write_run(folder, n=60, rollback_at=30, scale=1.0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for s in range(1, n + 1):
        mode = ["token", "document"][s % 2]
        loss = scale * (3.0 * np.exp(-s / 20) + 1.0) + 0.05 * rng.standard_normal()
        rec = {"step": s, "loss": loss, "lr": 1e-3 * min(1, s / 10), "grad_norm": 1.0, "tokens_per_s": 1e3,
               f"loss_{mode}": loss}
        if s % 20 == 0:
            rec.update(val_loss=loss + 0.1, val_loss_token=loss, val_loss_document=loss + 0.2, val_acc=0.4)
        lines.append(json.dumps(rec))
        if s == rollback_at:
            lines.append(json.dumps({"step": s, "event": "rollback", "reason": "loss spike", "restored_step": s - 5}))
            for redo in range(s - 4, s):  # the trainer redoes the undone steps (with new batches)
                lines.append(json.dumps({"step": redo, "loss": 1.5, "lr": 1e-3, "loss_token": 1.5}))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n{\"step\": 61, \"lo")  # a half-written last line
    return folder


def test_loss_curves_runs_objectives_lr_and_rollbacks(tmp_path):
    a = _write_run(tmp_path / "runA")
    b = _write_run(tmp_path / "runB", rollback_at=-1, scale=1.2)
    with pytest.warns(UserWarning, match="malformed"):
        fig = draw(viz.plot_loss_curves([a, b], smooth=0.5))
    ax, ax2 = fig.axes[0], fig.axes[1]
    ax_lr = fig.axes[2]  # the twin axis
    assert ax_lr.get_ylabel() == "learning rate"
    assert "Training and validation" in ax.get_title() and "per objective" in ax2.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["runA", "runB"] and "rollback" in legend
    vlines = [ln for ln in ax.lines if list(ln.get_xdata()) == [30, 30]]
    assert len(vlines) == 1  # runA's rollback; runB has none
    assert "steps undone by a rollback" in legend
    undone = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(undone) == 1 and list(undone[0].get_xdata()) == [26, 27, 28, 29, 30]
    smooth_a = ax.lines[2]  # runA: undone crosses, raw, EMA
    assert np.all(np.diff(smooth_a.get_xdata()) > 0)  # the curve follows the redone steps, never back in x
    assert {"token", "document"} <= {t.get_text() for t in ax2.get_legend().get_texts()}
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        viz.plot_loss_curves(tmp_path / "missing")


def test_loss_curves_one_objective_has_no_second_panel():
    """With a single objective the per-objective panel would repeat the left one: it is left out."""
    recs = [{"step": s, "loss": 3.0 / s, "loss_token": 3.0 / s, "lr": 1e-3} for s in range(1, 30)]
    fig = draw(viz.plot_loss_curves([recs], labels=["one"]))
    assert len([a for a in fig.axes if a.get_title()]) == 1


def test_split_rollbacks_without_restored_step():
    recs = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},
            {"step": 3, "event": "rollback"}, {"step": 2, "loss": 2.1}, {"step": 3, "loss": 1.9}]
    kept, undone = split_rollbacks(recs)
    assert [r["step"] for r in undone] == [2, 3]
    assert [(r["step"], r.get("loss")) for r in kept] == [(1, 3.0), (3, None), (2, 2.1), (3, 1.9)]


def test_ema_is_debiased_and_checks_its_argument():
    np.testing.assert_allclose(ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(ema([1.0, 3.0], 0.0), [1.0, 3.0])
    # a = 0.5: (a (1 - a) x1 + (1 - a) x2) / (1 - a²)
    np.testing.assert_allclose(ema([1.0, 3.0], 0.5), [1.0, (0.25 * 1.0 + 0.5 * 3.0) / 0.75])
    with pytest.raises(ValueError, match="smooth"):
        ema([1.0], 1.0)


# -- attention weights ----------------------------------------------------------------------------------------------

class _StubModel:
    """attention_probs returns a known (1, H, T, T) array: row-normalised over the visible keys."""

    def __init__(self, H):
        self.H = H

    def attention_probs(self, tokens, position_ids, block_position_ids, sep, layer):
        T = tokens.shape[1]
        vis = dense_mask(np.asarray(sep), T)[0].astype(np.float64)
        w = vis * (1.0 + np.arange(self.H)[:, None, None])
        return (w / w.sum(-1, keepdims=True))[None]


def test_attention_weights_one_head_and_grid():
    sample, names = viz.figure2_sample()
    fig = draw(viz.plot_attention_weights(_StubModel(3), sample, layer=0, head=1, tokenizer=names))
    ax = fig.axes[0]
    data = ax.images[0].get_array()
    assert np.ma.is_masked(data) and np.array_equal(~np.ma.getmaskarray(data), FIG2_MASK)
    np.testing.assert_allclose(data[5, :6].filled(0), np.full(6, 1 / 6))
    assert tick_texts(ax.get_xticklabels()) == FIG2_LABELS
    assert any(list(ln.get_xdata()) == [4.5, 4.5] for ln in ax.lines)  # the sep line
    fig = draw(viz.plot_attention_weights(_StubModel(6), sample, layer=0))
    assert [a.get_title() for a in fig.axes if a.images] == [f"head {h}" for h in range(6)]


def test_attention_heatmap_labels_every_token():
    """A 64-token window with its Part B (about 80 tokens) gets a label on every row and column."""
    T = 82
    probs = np.tril(np.ones((T, T)))
    probs /= probs.sum(-1, keepdims=True)
    fig = draw(viz.plot_attention_map(probs, sep=0, labels=[f"t{i}" for i in range(T)]))
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == T and tick_texts(ax.get_yticklabels())[:3] == ["t0", "t1", "t2"]
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 5.0


def test_attention_weights_of_a_real_model():
    from minglm.model import GLM, GLMConfig

    batch, tok = viz.sample_from_text("To be, or not to be.", seed=0)
    cfg = GLMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, max_len=64)
    model = GLM(cfg, np.random.default_rng(0))
    fig = draw(viz.plot_attention_weights(model, batch, layer=1, tokenizer=tok))
    maps = [a for a in fig.axes if a.images]
    assert len(maps) == 2
    data = maps[0].images[0].get_array()
    n = int(batch.lengths[0])
    assert data.shape == (n, n)
    np.testing.assert_allclose(data.filled(0).sum(-1), 1.0, rtol=1e-5)


# -- autograd graph ------------------------------------------------------------------------------------------------

def test_draw_graph_layers_and_labels():
    import minglm

    x = minglm.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    w = minglm.Tensor(np.ones((3, 4), np.float32), requires_grad=True)
    h = x @ w  # MatMul
    out = (h.tanh() + h).sum()  # h is used twice: directly and through tanh
    nodes, edges, root = build_graph(out)
    depth = longest_path_layers(nodes, edges, root)
    ops = {nodes[k]["label"].split("\n")[0]: depth[k] for k in nodes if nodes[k]["kind"] == "op"}
    assert ops["Sum"] == 0 and ops["Add"] == 1
    assert ops["MatMul"] == 3  # the longest path goes through Tanh (depth 2), not straight into Add
    leaves = [k for k in nodes if nodes[k]["kind"] == "leaf"]
    assert sorted(depth[k] for k in leaves) == [4, 4]
    _, _, _, routes = _layout(nodes, edges, depth)
    skips = [len(via) for (a, b), via in zip(edges, routes) if depth[a] - depth[b] > 1]
    assert skips == [1]  # MatMul (3) -> Add (1) passes one waypoint at depth 2, beside Tanh
    fig = draw(viz.draw_graph(out, names={id(x): "x", id(w): "w"}))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "x\n(2, 3)" in texts and "w\n(3, 4)" in texts and "MatMul\n(2, 4)" in texts
    assert "4 ops, 2 leaves" in fig.axes[0].get_title()


# -- run folder, CLI, fonts ------------------------------------------------------------------------------------------

def _fake_run(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar.\n" * 3)
    (corpus / "b.txt").write_text("Now is the winter of our discontent\nMade glorious summer by this sun.\n" * 3)
    run = _write_run(tmp_path / "runs" / "demo")
    tok = CharTokenizer.from_texts([(corpus / n).read_text() for n in ("a.txt", "b.txt")])
    tok.save(run / "tokenizer.json")
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "model": {},
                                                 "train": {"corpus": str(corpus), "objective": "glm-10b"}}))
    return run


def test_save_run_plots_writes_pngs(tmp_path):
    run = _fake_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the half-written log line
        written = viz.save_run_plots(run)
    assert sorted(p.name for p in written) == ["infill.png", "loss.png", "mask.png", "positions.png"]
    for p in written:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_png_and_svg(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert cli_main(["mask", "--text", "Friends, Romans, countrymen, lend me your ears", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    svg = tmp_path / "pos.svg"
    assert cli_main(["positions", "--figure2", "--convention", "paper", "--out", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml")
    run = _fake_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["loss", "--run", str(run), "--out", str(tmp_path / "loss.png")]) == 0
    assert cli_main(["infill", "--run", str(run), "--out", str(tmp_path / "infill.png")]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert cli_main(["mask", "--out", str(tmp_path / "bad.gif")]) == 2
    assert cli_main(["loss", "--out", str(tmp_path / "x.png")]) == 2  # no --run
    assert "pass --run" in capsys.readouterr().err


def test_figures_display_themselves_in_jupyter():
    fig = viz.plot_objective_masks()
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # IPython's hook: a cell ending in `fig` shows it


def test_cjk_font_fallback(monkeypatch):
    assert style.has_cjk(["床", "a"]) and not style.has_cjk(["a", "[M]"])
    assert style.font_kwargs(["a", "b"]) == {}
    monkeypatch.setattr(style, "cjk_font_name", lambda: "Noto Sans CJK SC")
    assert style.font_kwargs(["床"]) == {"fontfamily": ["DejaVu Sans", "Noto Sans CJK SC"]}
    monkeypatch.setattr(style, "cjk_font_name", lambda: None)
    style._warn_no_cjk_font.cache_clear()
    with pytest.warns(UserWarning, match="CJK"):
        assert style.font_kwargs(["床"]) == {}


def test_cjk_text_draws():
    batch, tok = viz.sample_from_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no CJK font on CI: matplotlib warns about glyphs
        fig = draw(viz.plot_blank_infilling(batch, tok))
        draw(viz.plot_attention_mask(batch, tokenizer=tok))
    assert "床" in [t.get_text() for t in fig.axes[0].texts]


@pytest.mark.parametrize("T, sep, bq, bk", [(64, 0, 16, 16), (64, 64, 16, 16), (100, 37, 16, 32), (50, 13, 7, 5)])
def test_tile_status_follows_the_twins_rules(T, sep, bq, bk):
    """Skipped exactly when the twin's _active says no sample sees the tile; full exactly when its _tile_mask is
    None (the twin applies no mask there)."""
    from minglm.kernels import twin

    status = viz.tile_status(T, sep, bq, bk)
    sep_h = np.array([sep])
    for a, i0 in enumerate(range(0, T, bq)):
        for b, j0 in enumerate(range(0, T, bk)):
            i1, j1 = min(i0 + bq, T), min(j0 + bk, T)
            skipped = twin._active(sep_h, i1, j0) == 0
            assert (status[a, b] == 0) == skipped, (a, b)
            if not skipped:
                mask = twin._tile_mask(np, sep_h, None, sep_h.reshape(1, 1, 1, 1), None, i0, i1, j0, j1)
                assert (status[a, b] == 2) == (mask is None or bool(mask.all())), (a, b)


def test_tile_map_legend_shows_the_colours_the_tiles_have():
    """Every skipped cell is masked, so it is drawn under the grey veil; its legend swatch must be that grey."""
    from matplotlib.colors import to_rgb

    from viz.tiles import shaded

    fig = draw(viz.plot_tile_map(128, [0], block_q=32, block_k=32))
    swatches = {t.get_text(): h.get_facecolor()[:3] for t, h in zip(fig.legends[0].get_texts(),
                                                                     fig.legends[0].legend_handles)}
    np.testing.assert_allclose(swatches["skipped"], shaded("#FFFFFF"))
    assert swatches["skipped"] != to_rgb("#FFFFFF") and max(swatches["skipped"]) < 0.9


def test_tile_map_draws_codes_and_shares():
    fig = draw(viz.plot_tile_map(128, [0, 50, 128], block_q=32, block_k=32))
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    codes = np.asarray(panels[1].images[0].get_array())
    assert codes.shape == (128, 128)
    np.testing.assert_array_equal(codes[::32, ::32], viz.tile_status(128, 50, 32, 32))
    assert panels[2].get_title() == "sep = 128: computes 100 %"  # sep = T: everything is visible
    assert viz.computed_share(128, 0, 32, 32) == pytest.approx(10 * 32 * 32 / 128**2)  # causal: the 10 tiles on/below
    with pytest.raises(ValueError, match="sep"):
        viz.tile_status(10, 11, 4, 4)


# -- byte-level BPE ------------------------------------------------------------------------------------------------


def test_bpe_merges_replay_to_the_tokenizers_encoding():
    from minglm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["the theatre, the thee, and thou that thinkest thou art there"] * 3, vocab_size=290)
    steps = viz.bpe_steps(tok, " theatre")
    assert steps[0][0] is None and len(steps[0][1]) == len(b" theatre")
    assert steps[-1][1] == tok.encode(" theatre")
    assert [r for r, _ in steps[1:]] == sorted(r for r, _ in steps[1:])  # merges in the order they were learned
    fig = draw(viz.plot_bpe_merges(tok, [" theatre", " thou"]))
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].texts if t.get_text().startswith(("bytes", "merge"))]
    assert labels[0] == "bytes" and len(labels) == len(steps)
