"""glm_loss computes only the Part-B rows past the last layer's attention (its projection, MLP, final LayerNorm
and the head), and the last layer's queries only from the first Part-B position on: the same logits, loss and
gradients as the full forward pass, for every layout of the layer."""

import numpy as np
import pytest

import minglm.functional as F
from minglm import prefix
from minglm.data.loader import BlockLoader
from minglm.model import GLM, GLMConfig, glm_loss
from minglm.tokenizer import CharTokenizer

TEXT = "the quality of mercy is not strained it droppeth as the gentle rain from heaven upon the place beneath "


@pytest.mark.parametrize("switches", [{}, {"norm": "deepnorm"}, {"position": "rope1d", "ffn": "geglu"},
                                      {"n_layer": 1, "position": "rope1d"}, {"softmax_scaling": True},
                                      {"position": "rope2d"}, {"prefix": 3}, {"prefix": 2, "position": "rope1d"},
                                      {"hide_own_token": True}, {"prefix": 2, "hide_own_token": True},
                                      {"position": "rope1d", "hide_own_token": True, "raw_part_a": True},
                                      {"prefix": 2, "n_layer": 3, "raw_part_a": True}],
                         ids=["pre-LN", "deepnorm", "rope-geglu", "one-layer", "fp32-softmax", "rope2d", "prefix",
                              "prefix-rope", "hidden-slot", "prefix-hidden-slot", "raw-part-a", "prefix-raw-part-a"])
def test_rows_give_the_full_logits_rows_and_the_same_loss_and_gradients(switches):
    switches = dict(switches)
    n_prefix = switches.pop("prefix", 0)
    tok = CharTokenizer.from_texts([TEXT])
    loader = BlockLoader([np.array(tok.encode(TEXT * 20))], tok, 48, 3, objective="glm-base", mask_ratio=0.3)
    batch = loader.next_batch(np.random.default_rng(1))
    cfg = GLMConfig.preset("tiny", **{"vocab_size": tok.vocab_size, "n_layer": 2, "d_model": 32, "n_head": 4,
                                      **switches})
    model = GLM(cfg, np.random.default_rng(0)).astype(np.float64)
    if n_prefix:  # prefix tuning puts trained keys in front of every layer's keys: Tk = P + T
        prefix.apply_prefix(model, n_prefix, np.random.default_rng(2))
        for p in model.parameters():
            p.requires_grad = True  # compare every gradient, not just the prefixes'
    rows = np.flatnonzero(batch.loss_mask.reshape(-1) > 0)
    T = batch.tokens.shape[1]
    # the last layer's queries start at the first Part-B position: the test covers the tail path
    assert model.layers[-1].attention._first_query(model.word_embeddings.weight, T, rows, None) == (rows % T).min() > 0

    full = model(batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep)  # (B, T, V)
    picked = model(batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep, rows=rows)  # (R, V)
    np.testing.assert_allclose(picked.data, full.data.reshape(-1, cfg.vocab_size)[rows], rtol=0, atol=1e-12)

    reference = F.cross_entropy(full, batch.targets, batch.loss_mask)
    reference.backward()
    want = {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = glm_loss(model, batch)
    loss.backward()
    assert abs(float(loss.item()) - float(reference.item())) < 1e-12
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, want[name], rtol=0, atol=1e-12, err_msg=name)


def test_attention_dropout_keeps_every_query_and_the_same_draws():
    """With attention dropout the rows path computes every query, as the full pass does, so that one seed draws
    the same dropout masks in both and they give the same loss and gradients."""
    tok = CharTokenizer.from_texts([TEXT])
    loader = BlockLoader([np.array(tok.encode(TEXT * 20))], tok, 48, 3, objective="glm-base", mask_ratio=0.3)
    batch = loader.next_batch(np.random.default_rng(1))
    cfg = GLMConfig.preset("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=4, attn_dropout=0.2)
    model = GLM(cfg, np.random.default_rng(0)).astype(np.float64)
    model.train()
    rows = np.flatnonzero(batch.loss_mask.reshape(-1) > 0)
    assert model.layers[-1].attention._first_query(model.word_embeddings.weight, batch.tokens.shape[1], rows, None) == 0

    full = model(batch.tokens, batch.position_ids, batch.block_position_ids, batch.sep, rng=np.random.default_rng(5))
    reference = F.cross_entropy(full, batch.targets, batch.loss_mask)
    reference.backward()
    want = {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = glm_loss(model, batch, rng=np.random.default_rng(5))
    loss.backward()
    assert abs(float(loss.item()) - float(reference.item())) < 1e-12
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, want[name], rtol=0, atol=1e-12, err_msg=name)
