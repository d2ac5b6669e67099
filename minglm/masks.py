"""GLM's attention mask, written once: who may attend to whom, computed from ``sep`` (the length of Part A).

GLM-paper §2.2 and Figure 2(d): the tokens of Part A (the corrupted text, keys ``j < sep``) are visible to every
query, and the tokens of Part B (the spans, from ``sep`` on) are visible causally, to themselves and to what follows
them. The official code builds it in ``mpu/transformer.py`` (``build_mask_matrix`` inside
``GPT2ParallelTransformer.forward``): ``tril`` of ones, plus every column before ``sep``.

A batch never stores this matrix (the model gets ``sep``); it is built for the plain attention path, for decoding
with a cache, for the kernels' reference, for plots and for tests, and they all call ``glm_mask``. The array module
``xp`` (NumPy or CuPy) is passed in, so this file imports nothing from minglm at all.
"""

from __future__ import annotations


def glm_mask(xp, sep, Tq: int, Tk: int | None = None, lengths=None):
    """The GLM mask (B, 1, Tq, Tk) of bools, True = the query may attend to the key.

    - ``sep`` (B,) ints (or one int): key j is visible to every query when j < sep[b].
    - Otherwise key j is visible to query i when j <= i + (Tk − Tq): the queries are the *last* Tq of the Tk
      positions. Tk = Tq (the default) is a whole sequence; Tq < Tk is decoding with a cache, where the new tokens
      come after the Tk − Tq cached ones (and ``sep`` still counts from the start of the cache).
    - ``lengths`` (B,), optional: query rows at or past the sample's length (padding) see nothing.

    The size-1 head axis broadcasts against scores of shape (B, nh, Tq, Tk).
    """
    Tk = Tq if Tk is None else Tk
    sep = xp.asarray(sep).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    q = xp.arange(Tq).reshape(1, 1, Tq, 1) + (Tk - Tq)  # (1, 1, Tq, 1): each query's index among the Tk keys
    k = xp.arange(Tk).reshape(1, 1, 1, Tk)  # (1, 1, 1, Tk)
    mask = (k < sep) | (k <= q)  # (B, 1, Tq, Tk)
    if lengths is not None:
        mask = mask & (q < xp.asarray(lengths).reshape(-1, 1, 1, 1))
    return mask


def own_token_mask(xp, pos_q, block_q, pos_k, block_k, own_slot: bool = True, other_spans: bool = False):
    """(B, 1, Tq, Tk) bools, False where a key is hidden from a query by a deviation from GLM, True elsewhere.
    Combine it with ``glm_mask`` by ``&``.

    - ``own_slot`` (``GLMConfig.hide_own_token``): a Part-B query (block id > 0) never meets the Part-A key (block id
      0) at its own position id. A Part-B token sits at the position of the blank it fills, so the key it loses is
      that blank's slot in Part A.
    - ``other_spans`` (``GLMConfig.raw_part_a``): a Part-B query never meets the Part-B keys of another span (another
      position id), which GLM's causal Part B shows it. With several layers those tokens have read the slot its own
      word sits in, and would hand it on.

    ``pos_q``, ``block_q`` (B, Tq) are the queries' position and block ids; ``pos_k``, ``block_k`` (B, Tk) the keys'
    (with a cache, everything cached so far).
    """
    pos_q, block_q = xp.asarray(pos_q), xp.asarray(block_q)
    pos_k, block_k = xp.asarray(pos_k), xp.asarray(block_k)
    part_b = block_q[:, :, None] > 0  # (B, Tq, 1)
    same = pos_q[:, :, None] == pos_k[:, None, :]  # (B, Tq, Tk)
    hidden = xp.zeros(same.shape, dtype=bool)
    if own_slot:
        hidden |= part_b & (block_k[:, None, :] == 0) & same
    if other_spans:
        hidden |= part_b & (block_k[:, None, :] > 0) & ~same
    return ~hidden[:, None]  # (B, 1, Tq, Tk)
