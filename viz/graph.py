"""The autograd computation graph behind a Tensor, drawn with matplotlib only (no graphviz).

`draw_graph(loss)` walks the graph the way `Tensor.backward` does: from the output, through each node's
`grad_fn` (the Function that made it, with `.name` and `.inputs`, see the contract) down to the leaves. Ops are
boxes labelled with `fn.name` and the shape of the tensor they produced; leaves are rounded boxes with their
shape (orange when they require a gradient, e.g. parameters; grey for constants), optionally named via
`names={id(tensor): "w"}` or `params=model.named_parameters()`. Layout: layered by the LONGEST path from the
output (the output at the bottom, every node one row above its furthest consumer, so arrows always point down);
an edge that skips rows is routed through waypoints between the boxes, and inside a row the nodes are ordered by
the mean x of their neighbours (the barycentre heuristic) to keep crossings few.

Left out: gradient values, the order backward visits the nodes (see `Tensor._topological_order`), and graphs of
more than `max_nodes` nodes (draw a smaller piece: one layer, one op).
"""

from __future__ import annotations

import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from viz.style import OKABE_ITO, new_figure

OP_COLOR = "#DCEBF7"  # light blue op boxes
PARAM_COLOR = "#F9DDB1"  # leaves that require grad (light Okabe-Ito orange)
CONST_COLOR = "#E6E6E6"  # leaves without grad


def _shape(t) -> str:
    try:
        return "(" + ", ".join(str(int(d)) for d in t.shape) + ")" if len(t.shape) else "scalar"
    except (AttributeError, TypeError):
        return "?"


def build_graph(tensor, names: dict | None = None, max_nodes: int = 300):
    """Nodes and edges of the graph that produced `tensor`.

    Returns (nodes, edges, root): nodes maps a key to a dict(kind="op"|"leaf", label=..., grad=bool); edges are
    (input key, consumer key) pairs (an input used twice by one op gives two edges); root is the output's key.
    """
    names = names or {}
    nodes: dict[int, dict] = {}
    edges: list[tuple[int, int]] = []

    def leaf_node(t) -> int:
        key = id(t)
        if key not in nodes:
            name = names.get(id(t))
            label = f"{name}\n{_shape(t)}" if name else _shape(t)
            nodes[key] = {"kind": "leaf", "label": label, "grad": bool(getattr(t, "requires_grad", False))}
        return key

    def op_key(fn) -> int:
        return id(fn)

    root_fn = getattr(tensor, "grad_fn", None)
    if root_fn is None:
        return {leaf_node(tensor): nodes[id(tensor)]}, [], id(tensor)
    nodes[op_key(root_fn)] = {"kind": "op", "label": f"{root_fn.name}\n{_shape(tensor)}", "grad": True}
    stack, seen = [root_fn], {id(root_fn)}
    while stack:  # iterative: deep graphs must not hit Python's recursion limit
        fn = stack.pop()
        for inp in getattr(fn, "inputs", ()) or ():
            if inp is None:
                continue
            child_fn = getattr(inp, "grad_fn", None)
            if child_fn is None:
                edges.append((leaf_node(inp), op_key(fn)))
            else:
                if id(child_fn) not in seen:
                    seen.add(id(child_fn))
                    nodes[op_key(child_fn)] = {"kind": "op", "label": f"{child_fn.name}\n{_shape(inp)}", "grad": True}
                    stack.append(child_fn)
                edges.append((op_key(child_fn), op_key(fn)))
            if len(nodes) > max_nodes:
                raise ValueError(f"draw_graph: the graph has more than max_nodes={max_nodes} nodes; draw a smaller "
                                 "piece (e.g. one layer) or raise max_nodes")
    return nodes, edges, op_key(root_fn)


def longest_path_layers(nodes: dict, edges: list[tuple[int, int]], root: int) -> dict[int, int]:
    """Layer of each node = the length of the longest path from it to the output (root = 0)."""
    consumers_left = {k: 0 for k in nodes}  # how many distinct consumer edges still unprocessed
    inputs_of: dict[int, list[int]] = {k: [] for k in nodes}
    for a, b in edges:
        consumers_left[a] += 1
        inputs_of[b].append(a)
    depth = {root: 0}
    ready = [root]
    while ready:  # Kahn's algorithm from the output: a node is final once all its consumers are
        node = ready.pop()
        for a in inputs_of[node]:
            depth[a] = max(depth.get(a, 0), depth[node] + 1)
            consumers_left[a] -= 1
            if consumers_left[a] == 0:
                ready.append(a)
    return depth


def _layout(nodes, edges, depth, sweeps: int = 2):
    """Positions for a layered drawing (the Sugiyama scheme, simplified).

    An edge that skips rows gets an invisible waypoint in every row it crosses, so that it is routed between the
    boxes instead of through them. Rows are then ordered by barycentres: top-down by the mean x of each node's
    consumers, bottom-up by the mean x of its inputs, `sweeps` times. Returns (x, width, n_layers, routes) with
    routes[i] = the waypoint keys of edges[i], from its input to its consumer.
    """
    n_layers = max(depth.values()) + 1
    width = {k: max(len(line) for line in nodes[k]["label"].split("\n")) * 0.11 + 0.5 for k in nodes}
    level = dict(depth)
    up: dict = {k: [] for k in nodes}  # consumers (one row below) of each node, waypoints included
    down: dict = {k: [] for k in nodes}  # inputs (one row above)
    routes = []
    for i, (a, b) in enumerate(edges):
        chain = [a] + [("via", i, d) for d in range(depth[a] - 1, depth[b], -1)] + [b]
        for w in chain[1:-1]:
            level[w], width[w], up[w], down[w] = w[2], 0.25, [], []
        for p, q in zip(chain[:-1], chain[1:]):
            up[p].append(q)
            down[q].append(p)
        routes.append(chain[1:-1])
    rows: list[list] = [[] for _ in range(n_layers)]
    for k, d in level.items():
        rows[d].append(k)
    x: dict = {}

    def place(row) -> None:
        total = sum(width[k] for k in row) + 0.4 * (len(row) - 1)
        pos = -total / 2
        for k in row:
            x[k] = pos + width[k] / 2
            pos += width[k] + 0.4

    place(rows[0])
    for sweep in range(sweeps):
        for d in range(1, n_layers):  # top-down in depth (output first): follow the consumers
            rows[d].sort(key=lambda k: np.mean([x[c] for c in up[k]]) if up[k] else 0.0)
            place(rows[d])
        if sweep < sweeps - 1:
            for d in range(n_layers - 2, -1, -1):  # back towards the output: follow the inputs
                rows[d].sort(key=lambda k: np.mean([x[c] for c in down[k]]) if down[k] else x.get(k, 0.0))
                place(rows[d])
    # Keep the order, but pull every node towards its neighbours so that edges (and waypoint chains) straighten.
    for _ in range(12):
        for d in list(range(n_layers)) + list(range(n_layers - 1, -1, -1)):
            row = rows[d]
            want = [np.mean([x[c] for c in up[k] + down[k]]) if up[k] + down[k] else x[k] for k in row]
            _compact(row, want, width, x)
    return x, width, n_layers, routes


def _compact(row, want, width, x, gap: float = 0.4) -> None:
    """Put the nodes of `row` (in this order) as close to `want` as their widths allow: the mean of a
    left-to-right pass (never left of the previous box) and a right-to-left pass (never right of the next)."""
    n = len(row)
    left, right = list(want), list(want)
    for i in range(1, n):
        left[i] = max(want[i], left[i - 1] + (width[row[i - 1]] + width[row[i]]) / 2 + gap)
    for i in range(n - 2, -1, -1):
        right[i] = min(want[i], right[i + 1] - (width[row[i + 1]] + width[row[i]]) / 2 - gap)
    for i, k in enumerate(row):
        x[k] = (left[i] + right[i]) / 2


def draw_graph(tensor, names: dict | None = None, params=None, max_nodes: int = 300, title: str | None = None):
    """Draw the computation graph that produced `tensor` and return the Figure.

    names: {id(tensor): "label"} for leaves; params: an iterable of (name, tensor) such as
    `model.named_parameters()`, merged into names.
    """
    names = dict(names or {})
    if params is not None:
        items = params.items() if isinstance(params, dict) else params
        names.update({id(t): n for n, t in items})
    nodes, edges, root = build_graph(tensor, names, max_nodes)
    depth = longest_path_layers(nodes, edges, root)
    x, width, n_layers, routes = _layout(nodes, edges, depth)
    span = max(x[k] + width[k] / 2 for k in x) - min(x[k] - width[k] / 2 for k in x)
    fig = new_figure(float(np.clip(span * 0.9 + 1.0, 6.0, 30.0)), float(np.clip(n_layers * 0.85 + 0.9, 2.5, 40.0)))
    ax = fig.add_subplot(1, 1, 1)
    h = 0.5
    seen_edges: dict[tuple[int, int], int] = {}
    for (a, b), via in zip(edges, routes):
        n_before = seen_edges.get((a, b), 0)  # an input used twice by one op (x * x): bend the repeats apart
        seen_edges[(a, b)] = n_before + 1
        pts = [(x[a], depth[a] - h / 2)] + [(x[w], float(w[2])) for w in via]
        if via:  # the skipped rows: a plain polyline through the waypoints, the arrow on the last piece
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#707070", linewidth=0.8)
        ax.add_patch(FancyArrowPatch(pts[-1], (x[b], depth[b] + h / 2), arrowstyle="-|>",
                                     mutation_scale=9, color="#707070", linewidth=0.8, shrinkA=0, shrinkB=1,
                                     connectionstyle=f"arc3,rad={0.25 * n_before}"))
    for k, node in nodes.items():
        if node["kind"] == "op":
            face, style = OP_COLOR, "square,pad=0"
        else:
            face, style = (PARAM_COLOR if node["grad"] else CONST_COLOR), "round,pad=0,rounding_size=0.12"
        edge = OKABE_ITO["black"] if k == root else "#606060"
        ax.add_patch(FancyBboxPatch((x[k] - width[k] / 2, depth[k] - h / 2), width[k], h, boxstyle=style,
                                    facecolor=face, edgecolor=edge, linewidth=1.6 if k == root else 0.8))
        ax.text(x[k], depth[k], node["label"], ha="center", va="center", fontsize=8,
                fontweight="bold" if node["kind"] == "op" else "normal")
    left = min(x[k] - width[k] / 2 for k in x)
    right = max(x[k] + width[k] / 2 for k in x)
    ax.set_xlim(left - 0.3, right + 0.3)
    ax.set_ylim(-0.7, n_layers - 0.3)
    ax.axis("off")
    n_ops = sum(1 for n in nodes.values() if n["kind"] == "op")
    ax.set_title(title or f"Computation graph: {n_ops} ops, {len(nodes) - n_ops} leaves\n(output at the bottom; "
                 "orange leaf = requires grad, grey = constant)", fontsize=10)
    return fig
