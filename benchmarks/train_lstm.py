"""AttentionLSTM training throughput: our faithful model against the same model built on
``paddle.nn.LSTM`` (Paddle's fused kernel), side by side in one run, at the seed's dimensions.

    python benchmarks/train_lstm.py [--batch 8] [--steps 4] [--seq 300] [--device cpu|gpu] [--amp]

Both models: features (B, 300, 2048) -> tanh(fc 1024) -> bidirectional LSTM 512 -> attention
-> fc1 8192 relu -> fc2 4096 tanh -> 3396 logits, centred RMSProp with L2 decay, sigmoid
cross-entropy summed over classes. Ours runs VideoTag's peephole LSTM (gate order c~,i,f,o,
clipped sigmoid, output gate on the new cell, reverse pass per sequence) on packed LoD rows,
through fluid's own ``lstm`` kernel (the default) and through our Python recurrence with its
hand-written backward (the fallback); the reference is a plain ``nn.LSTM`` (no peepholes, two
biases), the speed we would have with a non-faithful model. Timed steps alternate between the
models; each figure is the median. Goal: ours / reference >= 0.7.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reference_model(cfg):
    import paddle
    from paddle import nn

    class PaddleLSTMModel(nn.Layer):
        def __init__(self):
            super().__init__()
            self.rgb_fc = nn.Linear(cfg.feature_dim, cfg.embedding_size)
            self.lstm = nn.LSTM(cfg.embedding_size, cfg.lstm_size, direction="bidirect")
            self.rgb_weight = nn.Linear(2 * cfg.lstm_size, 1, bias_attr=False)
            self.fc1 = nn.Linear(2 * cfg.lstm_size, cfg.fc1_size)
            self.fc2 = nn.Linear(cfg.fc1_size, cfg.fc2_size)
            self.output = nn.Linear(cfg.fc2_size, cfg.num_classes)

        def forward(self, x, lengths):
            emb = paddle.tanh(self.rgb_fc(x))
            hidden, _ = self.lstm(emb, sequence_length=lengths)
            drop = nn.functional.dropout(hidden, cfg.drop_rate, training=self.training, mode="downscale_in_infer")
            valid = paddle.arange(x.shape[1], dtype="int64").unsqueeze(0) < lengths.unsqueeze(1)
            scores = self.rgb_weight(drop).squeeze(-1)
            scores = paddle.where(valid, scores, paddle.full_like(scores, float("-inf")))
            pooled = paddle.bmm(nn.functional.softmax(scores, axis=1).unsqueeze(1), drop).squeeze(1)
            return self.output(paddle.tanh(self.fc2(nn.functional.relu(self.fc1(pooled)))))

    paddle.seed(0)
    return PaddleLSTMModel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="videos per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model (after one warm-up step)")
    p.add_argument("--seq", type=int, default=300, help="segments per video (the seed: 300)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--amp", action="store_true", help="float16 autocast (GPU only)")
    args = p.parse_args()

    import paddle

    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model
    from vtplatform.train.lstm import make_optimizer, train_step

    device = (
        args.device
        if args.device != "auto"
        else ("gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() else "cpu")
    )
    paddle.set_device(device)
    cfg = AttentionLSTMConfig()  # the seed's dimensions
    rng = np.random.default_rng(0)
    x = rng.exponential(0.6, (args.batch, args.seq, cfg.feature_dim)).astype(np.float32)
    lengths = np.full(args.batch, args.seq, dtype=np.int64)
    y = (rng.random((args.batch, cfg.num_classes)) < 0.003).astype(np.float32)
    amp = "float16" if args.amp else "none"
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if args.amp else None

    models = {
        "ours, fluid lstm kernel": build_model(cfg),
        "ours, Python recurrence": build_model(AttentionLSTMConfig(lstm_kernel="python")),
        "paddle.nn.LSTM": reference_model(cfg),
    }
    optimizers = {name: make_optimizer(m, 1e-4, 8e-4) for name, m in models.items()}
    for m in models.values():
        m.train()

    def step(name: str) -> float:
        if device == "gpu":
            paddle.device.synchronize()
        start = time.perf_counter()
        train_step(models[name], optimizers[name], x, lengths, y, 1, amp, scaler)
        if device == "gpu":
            paddle.device.synchronize()
        return time.perf_counter() - start

    for name in models:
        step(name)  # warm-up: allocations, kernel selection
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            times[name].append(step(name))

    head = f"AttentionLSTM training, seed dims, batch {args.batch} x {args.seq} segments, {device}, amp {amp}"
    print(head)
    rates = {}
    for name, ts in times.items():
        rates[name] = args.batch / statistics.median(ts)
        each = ", ".join(f"{t:.2f}" for t in ts)
        print(f"  {name:<32} {statistics.median(ts):7.3f} s/step  {rates[name]:7.2f} samples/s  (steps: {each})")
    ours, fallback, ref = rates.values()
    print(f"  ratio ours / paddle.nn.LSTM     {ours / ref:.2f}  (goal >= 0.7; the model's default kernel)")
    print(f"  ratio Python recurrence / ref   {fallback / ref:.2f}  (the fallback where the fluid kernel is missing)")


if __name__ == "__main__":
    main()
