"""AttentionLSTM inference in numpy: the graph of ``AttentionLSTM.forward`` at evaluation, on the
BLAS that numpy links, for the CPU stages that tag, evaluate and predict.

Why: Paddle's dygraph matmul on CPU runs at a fraction of the BLAS's rate (the full-size model's
2048->1024 projection over 300 steps: 45 ms in Paddle, 13 ms in numpy, one thread each), and its
``lstm`` op's recurrence is slower than numpy's too; the whole model took about 200 ms a video on one
thread, this takes about half (``python benchmarks/retag.py --skip a,b,c``).

The same numbers as the Paddle model up to float32 rounding (``tests/models/test_lstm_numpy.py``:
logits within 1e-5 of it on the golden inputs and on random full-size ones): the peephole LSTM of
fluid's ``lstm`` op (gate blocks c~, i, f, o; peepholes W_ic, W_fc, W_oc in ``bias[4H:7H]``; the
output gate sees the new cell; the sigmoid's argument clipped to [-40, 13]), dropout as
``downscale_in_infer`` scales at inference, attention as a softmax over each sequence's own steps.
Each sequence runs its own steps (the reverse direction from its own end), as in fluid's LoD batches.
"""

from __future__ import annotations

import numpy as np

from vtplatform.models.attention_lstm import SIGMOID_CLIP, AttentionLSTMConfig


def _sigmoid(a: np.ndarray) -> np.ndarray:
    np.clip(a, *SIGMOID_CLIP, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    a += 1.0
    return np.reciprocal(a, out=a)


class NumpyAttentionLSTM:
    """``logits(x (B, T, D), lengths (B,)) -> (B, num_classes)`` float64, from the parameters of an
    ``AttentionLSTM`` (its ``state_dict`` in Paddle's names, as numpy arrays)."""

    def __init__(self, config: AttentionLSTMConfig, params: dict[str, np.ndarray]):
        p = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
        self.config, self.hidden = config, config.lstm_size
        self.fc = (p["rgb_fc.weight"], p["rgb_fc.bias"])
        self.directions = [
            (p[f"rgb_fc_{d}.weight"], p[f"rgb_lstm_{d}.weight"], p[f"rgb_lstm_{d}.bias"].reshape(-1))
            for d in ("forward", "backward")
        ]
        # dropout at inference (downscale_in_infer) is a scale: folded into the attention and pooling
        self.keep = np.float32(1.0 - config.drop_rate)
        self.att = p["rgb_weight.weight"].reshape(-1)
        self.head = [(p[f"{n}.weight"], p[f"{n}.bias"]) for n in ("fc1", "fc2", "output")]

    @classmethod
    def from_model(cls, model) -> NumpyAttentionLSTM:
        return cls(model.config, {k: v.numpy() for k, v in model.state_dict().items()})

    def logits(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, np.int64)
        b, t = len(lengths), x.shape[1]
        if lengths.min() < 1 or lengths.max() > t:
            raise ValueError(f"lengths must be in [1, {t}], got {lengths.tolist()}")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rows = np.concatenate([i * t + np.arange(n) for i, n in enumerate(lengths)])  # packed, LoD order
        seq = np.ascontiguousarray(x, dtype=np.float32).reshape(b * t, -1)[rows]
        emb = seq @ self.fc[0]
        emb += self.fc[1]
        np.tanh(emb, out=emb)
        hidden = np.concatenate(
            [lstm(emb @ w_x, w_h, bias, lengths, reverse) for (w_x, w_h, bias), reverse in
             zip(self.directions, (False, True), strict=True)],
            axis=1,
        )  # fmt: skip
        hidden *= self.keep  # (N, 2H)
        scores = hidden @ self.att
        starts = offsets[:-1]
        scores -= np.repeat(np.maximum.reduceat(scores, starts), lengths)
        weights = np.exp(scores)
        weights /= np.repeat(np.add.reduceat(weights, starts), lengths)
        out = np.add.reduceat(hidden * weights[:, None], starts, axis=0)  # (B, 2H)
        for (w, bias), act in zip(self.head, ("relu", "tanh", None), strict=True):
            out = out @ w
            out += bias
            if act == "relu":
                np.maximum(out, 0, out=out)
            elif act == "tanh":
                np.tanh(out, out=out)
        return out.astype(np.float64)


def lstm(gates_x: np.ndarray, weight: np.ndarray, bias: np.ndarray, lengths: np.ndarray, reverse: bool) -> np.ndarray:
    """Fluid's ``lstm`` op with peepholes on packed sequences: projected inputs ``gates_x`` (N, 4H)
    in LoD order, ``weight`` (H, 4H), ``bias`` (7H,) or (1, 7H) -> hidden states (N, H), each
    sequence from h0 = c0 = 0. Sequences run side by side, longest first; at step s the n sequences
    still running take their step s (from their own end, ``reverse``)."""
    lengths = np.asarray(lengths, np.int64)
    h_size = weight.shape[0]
    bias = bias.reshape(-1)
    gate_bias, (w_ic, w_fc, w_oc) = bias[: 4 * h_size], bias[4 * h_size :].reshape(3, h_size)
    order = np.argsort(-lengths, kind="stable")
    sorted_len, starts = lengths[order], np.concatenate([[0], np.cumsum(lengths)])[:-1][order]
    h = np.zeros((len(order), h_size), np.float32)
    c = np.zeros_like(h)
    out = np.empty((len(gates_x), h_size), np.float32)
    for step in range(int(sorted_len[0])):
        n = int(np.count_nonzero(sorted_len > step))
        at = starts[:n] + (sorted_len[:n] - 1 - step if reverse else step)
        g = gates_x[at]
        g += h[:n] @ weight
        g += gate_bias
        g_c, g_i, g_f, g_o = (g[:, k * h_size : (k + 1) * h_size] for k in range(4))
        c_n = c[:n]  # a view: updated in place
        i = _sigmoid(g_i + c_n * w_ic)
        f = _sigmoid(g_f + c_n * w_fc)
        c_n *= f
        c_n += np.tanh(g_c) * i
        o = _sigmoid(g_o + c_n * w_oc)  # the peephole on the new cell
        h[:n] = o * np.tanh(c_n)
        out[at] = h[:n]
    return out
