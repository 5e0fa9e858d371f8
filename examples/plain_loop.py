"""CoherenceMonitor in a plain PyTorch training loop (digits MLP, SGD with momentum).

Run:  python examples/plain_loop.py      (about half a minute on a laptop CPU)
Then: tensorboard --logdir runs/plain_loop
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from torch_coherence import CoherenceMonitor


def main(epochs: int = 5, lr: float = 0.05, batch_size: int = 32) -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    writer = SummaryWriter("runs/plain_loop")
    # probe: 256 examples drawn (seeded) from the training set; n = len(data) = 1797
    monitor = CoherenceMonitor(
        model, loss_fn, data, writer=writer, every_n_steps=25, probe_size=256
    )
    monitor.start(opt, batch_size=batch_size)  # the pre-flight probe, before the first step
    for epoch in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            # the loss feeds the per-step guard (a non-finite or jumping loss probes at once)
            result = monitor.step(opt, batch_size=xb.shape[0], loss=loss)
            if result is not None and result.report is not None:
                r = result.report
                print(
                    f"epoch {epoch} step {result.step:4d}: sigma {r.sigma:7.3g}  "
                    f"sharpness {r.sharpness:6.3g}  margin {r.margin:.3f}  "
                    f"critical lr {r.critical_lr:.3g}  critical B {r.critical_batch_size:.3g}"
                )
        monitor.log_figure()  # (B, lr) phase plane, once per epoch
    writer.close()
    print(monitor.probe.last_report.explain())


if __name__ == "__main__":
    main()
