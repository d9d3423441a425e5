"""VideoTag's AttentionLSTM tagger in Paddle dygraph, faithful to the original fluid program.

    x (B, T, D) -> tanh(fc) -> per direction: fc (no bias) -> peephole LSTM -> concat
      -> dropout (0.5*x at inference) -> attention (fc to one score, softmax over valid steps)
      -> weighted sum -> fc1 relu -> fc2 tanh -> output -> sigmoid

Batches come padded, with ``lengths``; inside, the valid steps are packed in fluid's LoD order,
so each sequence is computed exactly as if it ran alone and padding costs nothing. The reverse
direction runs over each sequence's own steps.

The LSTM is fluid's ``lstm`` op with peepholes (gate order c~, i, f, o; ``bias[4H:7H]`` holds the
peephole weights W_ic, W_fc, W_oc; the output gate sees the new cell; Paddle's clipped sigmoid
1/(1+exp(-clip(a, -40, 13)))). Paddle 3 still ships that op's kernel, and we call it on LoD
tensors ("op"). ``peephole_lstm`` is the same recurrence written with Paddle ops and a
hand-written backward ("python"), for builds or devices without the kernel; both give the same
numbers (see the tests).

Parameters carry the official fluid names (``rgb_lstm_forward.b_0`` ...; see ``fluid_name_map``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from vtplatform.models import weights as wts

log = logging.getLogger(__name__)

SIGMOID_CLIP = (-40.0, 13.0)  # Paddle's activation clip inside the lstm op

# Parameters whose L2 decay the original exempts (ParamAttr(regularizer=L2Decay(0.0))).
NO_DECAY = ("rgb_fc.b_0", "fc1.b_0", "fc2.b_0", "output.b_0")
OUTPUT_LAYER = ("output.w_0", "output.b_0")


@dataclass(frozen=True)
class AttentionLSTMConfig:
    feature_dim: int = 2048
    embedding_size: int = 1024
    lstm_size: int = 512
    fc1_size: int = 8192  # hard-coded in the original
    fc2_size: int = 4096  # hard-coded in the original
    num_classes: int = 3396
    drop_rate: float = 0.5
    lstm_kernel: str = "auto"  # auto | op (fluid's lstm kernel) | python (our recurrence); same numbers

    def __post_init__(self) -> None:
        for key in ("feature_dim", "embedding_size", "lstm_size", "fc1_size", "fc2_size", "num_classes"):
            if getattr(self, key) <= 0:
                raise ValueError(f"AttentionLSTM {key} must be > 0, got {getattr(self, key)}")
        if self.lstm_kernel not in ("auto", "op", "python"):
            raise ValueError(f"lstm_kernel must be auto, op or python, got {self.lstm_kernel!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"MODEL.drop_rate must be in [0, 1), got {self.drop_rate}")

    @classmethod
    def from_model_section(cls, model, feature_dim: int | None = None) -> AttentionLSTMConfig:
        """From the seed's MODEL section; ``feature_dim`` (from a feature table) wins over
        ``MODEL.feature_dims``."""
        if len(model.feature_dims) != 1:
            raise ValueError(
                "MODEL.feature_dims: one feature stream (rgb) is supported, as in VideoTag; "
                f"got {list(model.feature_dims)}"
            )
        return cls(
            feature_dim=feature_dim or model.feature_dims[0],
            embedding_size=model.embedding_size,
            lstm_size=model.lstm_size,
            fc1_size=model.fc1_size,
            fc2_size=model.fc2_size,
            num_classes=model.num_classes,
            drop_rate=model.drop_rate,
        )


class PeepholeLSTMWeights(nn.Layer):
    """One direction's ``lstm`` op parameters: ``weight`` [H, 4H] (recurrent, blocks c~|i|f|o)
    and ``bias`` [1, 7H] (b_c, b_i, b_f, b_o, then the peepholes W_ic, W_fc, W_oc)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = self.create_parameter([hidden, 4 * hidden], default_initializer=nn.initializer.XavierUniform())
        self.bias = self.create_parameter(
            [1, 7 * hidden], is_bias=True, default_initializer=nn.initializer.Constant(0.0)
        )


def peephole_lstm(
    x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, with_cell: bool = False
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """The ``lstm`` op recurrence over a stack of independent directions, from h0 = c0 = 0.

    x (K, B, T, 4H) projected inputs; weight (K, H, 4H); bias (K, 1, 7H).
    Returns the hidden states (K, B, T, H) and, ``with_cell``, the cell states (else None).
    Steps run left to right: a reversed direction is passed in already reversed. Runs in
    float32 whatever the autocast state.
    """
    with paddle.amp.auto_cast(enable=False):
        x, weight, bias = (
            v.astype("float32") if v.dtype in (paddle.float16, paddle.bfloat16) else v for v in (x, weight, bias)
        )
        if with_cell:
            return _PeepholeLSTM.apply(x, weight, bias, True)
        return _PeepholeLSTM.apply(x, weight, bias, False), None


class _PeepholeLSTM(paddle.autograd.PyLayer):
    """Forward and a hand-written backward (BPTT) of the peephole LSTM.

    Inside, every per-step tensor is contiguous and gate-major: the inputs of step t are
    (4, K, B, H) (gate blocks c~, i, f, o), the recurrent weights (4, K, H, H). Autograd through
    300 steps of small ops spends most of its time on bookkeeping; here each backward step is one
    batched matmul plus element-wise ops, and the weight, bias and peephole gradients are one
    large matmul over all steps. The gate derivatives are taken from the gate outputs, y(1-y),
    as the ``lstm`` op's backward does (no clip mask).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, with_cell):
        k, b, t_len, four_h = x.shape
        h_size = four_h // 4
        lo, hi = SIGMOID_CLIP
        steps = paddle.unbind(x.reshape([k, b, t_len, 4, h_size]).transpose([2, 3, 0, 1, 4]).contiguous(), axis=0)
        weight4 = weight.reshape([k, h_size, 4, h_size]).transpose([2, 0, 1, 3]).contiguous()  # (4, K, H, H)
        bias4 = bias[:, :, : 4 * h_size].reshape([k, 1, 4, h_size]).transpose([2, 0, 1, 3]).contiguous()  # (4, K, 1, H)
        w_ic, w_fc, w_oc = paddle.unbind(bias[:, :, 4 * h_size :].reshape([k, 1, 3, h_size]), axis=2)  # (K, 1, H) each
        h = paddle.zeros([k, b, h_size], dtype=x.dtype)
        c = paddle.zeros([k, b, h_size], dtype=x.dtype)
        hs, cs, tanh_cs, cands, i_s, f_s, o_s = [], [], [], [], [], [], []
        for x_t in steps:
            g_c, g_i, g_f, g_o = paddle.unbind(x_t + (paddle.matmul(h, weight4) + bias4), axis=0)  # (K, B, H) each
            i = nn.functional.sigmoid(paddle.clip(g_i + c * w_ic, lo, hi))
            f = nn.functional.sigmoid(paddle.clip(g_f + c * w_fc, lo, hi))
            cand = paddle.tanh(g_c)
            c = cand * i + c * f
            o = nn.functional.sigmoid(paddle.clip(g_o + c * w_oc, lo, hi))  # peephole on the NEW cell
            tanh_c = paddle.tanh(c)
            h = o * tanh_c
            hs.append(h)
            cs.append(c)
            tanh_cs.append(tanh_c)
            cands.append(cand)
            i_s.append(i)
            f_s.append(f)
            o_s.append(o)
        by_step = [paddle.stack(v) for v in (cs, tanh_cs, cands, i_s, f_s, o_s)]  # (T, K, B, H) each
        by_dir = [paddle.stack(v, axis=1) for v in (hs, cs)]  # (K, T, B, H) each
        ctx.save_for_backward(weight4, bias, *by_step, *by_dir)
        hidden = paddle.stack(hs, axis=2)  # (K, B, T, H)
        return (hidden, paddle.stack(cs, axis=2)) if with_cell else hidden

    @staticmethod
    def backward(ctx, d_hidden, d_cell=None):
        weight4, bias, cell, tanh_c, cand, i, f, o, hidden_k, cell_k = ctx.saved_tensor()
        t_len, k, b, h_size = cell.shape
        zeros = paddle.zeros([1, k, b, h_size], dtype=cell.dtype)
        cell_prev = paddle.concat([zeros, cell[:-1]], axis=0)
        w_ic, w_fc, w_oc = paddle.unbind(bias[:, :, 4 * h_size :].reshape([k, 1, 3, h_size]), axis=2)
        # Per-step factors, for all steps at once.
        dc_from_h = o * (1.0 - tanh_c * tanh_c)  # dc += dh * this
        da_o_from_h = tanh_c * o * (1.0 - o)  # d(pre-activation of o) = dh * this
        from_dc = paddle.stack([i * (1.0 - cand * cand), cand * i * (1.0 - i), cell_prev * f * (1.0 - f)], axis=1)
        d_h = paddle.unbind(d_hidden.transpose([2, 0, 1, 3]).contiguous(), axis=0)  # T x (K, B, H)
        d_c = [None] * t_len
        if d_cell is not None:
            d_c = paddle.unbind(d_cell.transpose([2, 0, 1, 3]).contiguous(), axis=0)
        dc_h, dao_h, fdc, f_t = (paddle.unbind(v, axis=0) for v in (dc_from_h, da_o_from_h, from_dc, f))
        weight4_t = weight4.transpose([0, 1, 3, 2]).contiguous()
        dh_next = paddle.zeros([k, b, h_size], dtype=cell.dtype)
        dc_next = paddle.zeros([k, b, h_size], dtype=cell.dtype)
        d_gates = [None] * t_len
        for t in range(t_len - 1, -1, -1):
            dh = d_h[t] + dh_next
            da_o = dh * dao_h[t]
            dc = dc_next + dh * dc_h[t] + da_o * w_oc
            if d_c[t] is not None:
                dc = dc + d_c[t]
            d3 = dc.unsqueeze(0) * fdc[t]  # (3, K, B, H): d pre-activation of c~, i, f
            _, da_i, da_f = paddle.unbind(d3, axis=0)
            dg = paddle.concat([d3, da_o.unsqueeze(0)], axis=0)  # (4, K, B, H)
            dc_next = dc * f_t[t] + da_i * w_ic + da_f * w_fc
            dh_next = paddle.matmul(dg, weight4_t).sum(axis=0)
            d_gates[t] = dg
        by_gate = paddle.stack(d_gates, axis=2)  # (4, K, T, B, H)
        d_x = by_gate.transpose([1, 3, 2, 0, 4]).contiguous().reshape([k, b, t_len, 4 * h_size])
        flat = by_gate.reshape([4, k, t_len * b, h_size])
        hidden_prev = paddle.concat([zeros.transpose([1, 0, 2, 3]), hidden_k[:, :-1]], axis=1)  # (K, T, B, H)
        d_weight4 = paddle.matmul(hidden_prev.reshape([k, t_len * b, h_size]), flat, transpose_x=True)  # (4, K, H, H)
        d_weight = d_weight4.transpose([1, 2, 0, 3]).reshape([k, h_size, 4 * h_size])
        # Sums over (T, B) as matmuls with ones: the gate biases and the peepholes.
        ones = paddle.ones([1, t_len * b], dtype=flat.dtype)
        d_gate_bias = paddle.matmul(ones, flat)  # (4, K, 1, H)
        cell_prev_k = paddle.concat([zeros.transpose([1, 0, 2, 3]), cell_k[:, :-1]], axis=1).reshape(
            [k, t_len * b, h_size]
        )
        d_if = paddle.matmul(ones, flat[1:3] * cell_prev_k)  # (2, K, 1, H)
        d_o = paddle.matmul(ones, flat[3] * cell_k.reshape([k, t_len * b, h_size]))  # (K, 1, H)
        d_bias = paddle.concat(
            [
                d_gate_bias.transpose([1, 2, 0, 3]).reshape([k, 1, 4 * h_size]),
                d_if.transpose([1, 2, 0, 3]).reshape([k, 1, 2 * h_size]),
                d_o,
            ],
            axis=-1,
        )
        return d_x, d_weight, d_bias


@dataclass(frozen=True)
class Packing:
    """Where each sequence's valid steps sit. Packed rows are fluid's LoD order: sequence after
    sequence, each in time order."""

    lengths: np.ndarray  # (B,) int64, all >= 1
    max_len: int

    @property
    def offsets(self) -> list[int]:
        return [0, *np.cumsum(self.lengths).tolist()]

    def rows(self, reverse: bool = False) -> np.ndarray:
        """For packed row n = (b, s): its position b*T + s in the padded batch (with ``reverse``,
        b*T + L_b-1-s, the position that a run over the reversed sequence gives it)."""
        steps = [np.arange(n)[::-1] if reverse else np.arange(n) for n in self.lengths]
        return np.concatenate([b * self.max_len + s for b, s in enumerate(steps)]).astype(np.int64)

    def segment_ids(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths)), self.lengths).astype(np.int64)


def _padded(x: paddle.Tensor, rows: paddle.Tensor, size: int, fill: float = 0.0) -> paddle.Tensor:
    base = paddle.full([size, *x.shape[1:]], fill, dtype=x.dtype)
    return paddle.scatter(base, rows, x)


_OP_CHECKED: dict[str, bool] = {}


def lstm_kernel(requested: str = "auto") -> str:
    """ "op": fluid's own ``lstm`` kernel, which Paddle 3 still ships (``_C_ops.lstm`` on LoD
    tensors); "python": ``peephole_lstm`` above. "auto" takes the op when it runs on the current
    device and agrees with the Python recurrence on a small case."""
    if requested != "auto":
        return requested
    place = str(paddle.get_device())
    if place not in _OP_CHECKED:
        _OP_CHECKED[place] = _op_works()
        if not _OP_CHECKED[place]:
            log.warning("fluid's lstm kernel is not usable on %s; AttentionLSTM runs its Python recurrence", place)
    return "op" if _OP_CHECKED[place] else "python"


def _op_works() -> bool:
    if not hasattr(paddle._C_ops, "lstm"):
        return False
    rng = np.random.default_rng(0)
    packing = Packing(np.array([3, 1]), 3)
    x = rng.normal(0, 1, (4, 8)).astype(np.float32)
    w, b = rng.normal(0, 0.5, (2, 8)).astype(np.float32), rng.normal(0, 0.5, (1, 14)).astype(np.float32)
    try:
        with paddle.no_grad():
            got = [
                sequence_lstm(paddle.to_tensor(x), packing, paddle.to_tensor(w), paddle.to_tensor(b), r, "op")[0]
                for r in (0, 1)
            ]
            want = [
                sequence_lstm(paddle.to_tensor(x), packing, paddle.to_tensor(w), paddle.to_tensor(b), r, "python")[0]
                for r in (0, 1)
            ]
        return all(np.allclose(g.numpy(), v.numpy(), atol=1e-5) for g, v in zip(got, want, strict=True))
    except Exception as exc:  # an op missing from this build or device
        log.debug("fluid lstm kernel unavailable: %s", exc)
        return False


def sequence_lstm(
    x: paddle.Tensor, packing: Packing, weight: paddle.Tensor, bias: paddle.Tensor, is_reverse: bool, kernel: str
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Fluid's ``lstm`` op semantics on packed rows: x (N, 4H) already projected, weight (H, 4H),
    bias (1, 7H). Returns hidden and cell (N, H); row n belongs to input row n, and the reverse
    direction runs each sequence from its own end."""
    x, weight, bias = (v.astype("float32") for v in (x, weight, bias))
    if kernel == "op":
        with paddle.amp.auto_cast(enable=False):
            x.get_tensor().set_lod([packing.offsets])  # x is a fresh projection: it may carry the LoD
            out = paddle._C_ops.lstm(
                x,
                None,
                None,
                weight,
                bias,
                True,
                bool(is_reverse),
                not paddle.is_grad_enabled(),
                "sigmoid",
                "tanh",
                "tanh",
            )
        return out[0], out[1]  # hidden, cell (training also returns the op's batch buffers)
    b, t = len(packing.lengths), packing.max_len
    rows = paddle.to_tensor(packing.rows(is_reverse))
    padded = _padded(x, rows, b * t).reshape([1, b, t, -1])
    hidden, cell = peephole_lstm(padded, weight.unsqueeze(0), bias.unsqueeze(0), with_cell=True)
    return paddle.gather(hidden.reshape([b * t, -1]), rows), paddle.gather(cell.reshape([b * t, -1]), rows)


def lstm_op(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    lengths: np.ndarray,
    is_reverse: bool = False,
    kernel: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Fluid's ``lstm`` op (``use_peepholes=True``) on a LoD batch: ``x`` [sum(lengths), 4H] already
    projected, ``weight`` [H, 4H], ``bias`` [1, 7H]. Returns hidden and cell [sum(lengths), H]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    packing = Packing(lengths, int(lengths.max()))
    with paddle.no_grad():
        args = (paddle.to_tensor(x), packing, paddle.to_tensor(weight), paddle.to_tensor(bias), is_reverse)
        hidden, cell = sequence_lstm(*args, lstm_kernel(kernel))
    return hidden.numpy(), cell.numpy()


class AttentionLSTM(nn.Layer):
    """Padded features (B, T, D) and lengths (B,) -> logits (B, num_classes).

    Inside, the valid steps are packed as fluid's LoD batches were, so every layer sees exactly
    the rows the original saw and padding costs nothing.
    """

    def __init__(self, config: AttentionLSTMConfig):
        super().__init__()
        self.config = config
        d, e, h = config.feature_dim, config.embedding_size, config.lstm_size
        self.rgb_fc = nn.Linear(d, e)
        self.rgb_fc_forward = nn.Linear(e, 4 * h, bias_attr=False)
        self.rgb_lstm_forward = PeepholeLSTMWeights(h)
        self.rgb_fc_backward = nn.Linear(e, 4 * h, bias_attr=False)
        self.rgb_lstm_backward = PeepholeLSTMWeights(h)
        self.rgb_weight = nn.Linear(2 * h, 1, bias_attr=False)
        self.fc1 = nn.Linear(2 * h, config.fc1_size)
        self.fc2 = nn.Linear(config.fc1_size, config.fc2_size)
        self.output = nn.Linear(config.fc2_size, config.num_classes)

    def forward(self, x: paddle.Tensor, lengths: paddle.Tensor) -> paddle.Tensor:
        return self.forward_with_intermediates(x, lengths)["logits"]

    def forward_with_intermediates(self, x: paddle.Tensor, lengths: paddle.Tensor) -> dict[str, paddle.Tensor]:
        """Logits plus the original graph's intermediates; per-step ones are packed (N, C)."""
        b, t, _ = x.shape
        packing = Packing(np.asarray(lengths.numpy() if isinstance(lengths, paddle.Tensor) else lengths, np.int64), t)
        if packing.lengths.min() < 1 or packing.lengths.max() > t:
            raise ValueError(f"lengths must be in [1, {t}], got {packing.lengths.tolist()}")
        rows = paddle.to_tensor(packing.rows())
        kernel = lstm_kernel(self.config.lstm_kernel)
        seq = paddle.gather(x.reshape([b * t, -1]), rows)  # (N, D): the valid steps, LoD order
        emb = paddle.tanh(self.rgb_fc(seq))  # (N, E)
        h_fwd, _ = sequence_lstm(
            self.rgb_fc_forward(emb), packing, self.rgb_lstm_forward.weight, self.rgb_lstm_forward.bias, False, kernel
        )
        h_bwd, _ = sequence_lstm(
            self.rgb_fc_backward(emb), packing, self.rgb_lstm_backward.weight, self.rgb_lstm_backward.bias, True, kernel
        )
        drop = nn.functional.dropout(
            paddle.concat([h_fwd, h_bwd], axis=-1),
            p=self.config.drop_rate,
            training=self.training,
            mode="downscale_in_infer",
        )  # (N, 2H)
        scores = _padded(self.rgb_weight(drop).squeeze(-1), rows, b * t, float("-inf")).reshape([b, t])
        att = paddle.gather(nn.functional.softmax(scores, axis=1).reshape([-1]), rows)  # (N,): sequence softmax
        pooled = paddle.geometric.segment_sum(
            drop * att.unsqueeze(-1), paddle.to_tensor(packing.segment_ids())
        )  # (B, 2H)
        fc1 = nn.functional.relu(self.fc1(pooled))
        fc2 = paddle.tanh(self.fc2(fc1))
        logits = self.output(fc2)
        return {
            "rgb_fc_out": emb,
            "lstm_fwd_hidden": h_fwd,
            "lstm_bwd_hidden": h_bwd,
            "att_weight": att,
            "pooled": pooled,
            "fc1": fc1,
            "fc2": fc2,
            "logits": logits,
        }


def fluid_name_map(model: AttentionLSTM | None = None) -> dict[str, str]:
    """{fluid parameter name: our state_dict key}, in the original program's creation order."""
    names = {}
    for layer in (
        "rgb_fc",
        "rgb_fc_forward",
        "rgb_lstm_forward",
        "rgb_fc_backward",
        "rgb_lstm_backward",
        "rgb_weight",
        "fc1",
        "fc2",
        "output",
    ):
        names[f"{layer}.w_0"] = f"{layer}.weight"
        if layer not in ("rgb_fc_forward", "rgb_fc_backward", "rgb_weight"):
            names[f"{layer}.b_0"] = f"{layer}.bias"
    return names


def no_decay_keys() -> set[str]:
    """state_dict keys the seed's L2 decay leaves out (the biases of rgb_fc, fc1, fc2, output)."""
    mapping = fluid_name_map()
    return {mapping[n] for n in NO_DECAY}


def build_model(config: AttentionLSTMConfig, seed: int = 0) -> AttentionLSTM:
    """A freshly initialised model (Xavier-uniform weights, zero biases, as fluid's defaults),
    identical in every process for the same seed."""
    paddle.seed(seed)
    return AttentionLSTM(config)


def reinit_layer(layer: nn.Linear, seed: int) -> None:
    """Xavier-uniform weight and zero bias, as a freshly built fluid fc."""
    fan_in, fan_out = layer.weight.shape
    limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
    rng = np.random.default_rng(seed)
    layer.weight.set_value(rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32"))
    layer.bias.set_value(np.zeros([fan_out], dtype="float32"))


def load_weights(model: AttentionLSTM, path: str, seed: int = 0) -> dict:
    """Loads a weight file into ``model``: the official VideoTag file (fluid names), an ``.npz``
    in the same names, or one of our checkpoints (see ``load_state``)."""
    return load_state(model, wts.read_state(path), str(path), seed)


def load_state(model: AttentionLSTM, state: dict[str, np.ndarray], source: str = "weights", seed: int = 0) -> dict:
    """Copies ``state`` ({fluid name: array}) into ``model``.

    When the state's output layer has a different number of classes than the model (a fine-tune
    to a new label set), every other layer loads and the output layer is re-initialised; this is
    logged and reported. Any other mismatch raises ``WeightsError``. Returns a summary:
    ``{"reinitialised": [...], "unused": [...], "fingerprint": ...}``.
    """
    name_map = fluid_name_map(model)
    params = model.state_dict()
    skip: list[str] = []
    file_w, model_w = state.get("output.w_0"), params[name_map["output.w_0"]]
    if (
        file_w is not None
        and file_w.ndim == 2
        and file_w.shape[0] == model_w.shape[0]
        and file_w.shape[1] != model_w.shape[1]
    ):
        log.warning(
            "%s has %d output classes, the model %d: loading every layer except the output layer, which is "
            "re-initialised (fine-tuning to a new label set)",
            source,
            file_w.shape[1],
            model_w.shape[1],
        )
        skip = list(OUTPUT_LAYER)
        reinit_layer(model.output, seed)
    unused = wts.assign(model, state, name_map, skip=skip)
    if unused:
        log.info("%s: ignored %d entries the model does not use (e.g. %s)", source, len(unused), unused[:3])
    return {"reinitialised": skip, "unused": unused, "fingerprint": wts.model_fingerprint(model, name_map)}
