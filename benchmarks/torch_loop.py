"""The visualize preset's experiment as an idiomatic PyTorch training loop, with the same work as
``plain_jax.py``: per step, the loss and every kernel gradient's mean, std, L2 norm,
mean |g| and max |g|, every bias gradient's norm and the global gradient norm; per
epoch, loss and accuracy on all points and each kernel's mean and std.

One run trains one seed: a PyTorch loop has no vmap over whole training runs, so S
seeds are S runs, one after the other (``torch_vmap.py`` trains S seeds at once with
``torch.func.vmap``).

``device="cuda"`` trains on the GPU: the model is made on the CPU (so a seed's initial
parameters and shuffles are the CPU's, whatever the device), then moved; the data, the
shuffles and the recorded statistics live on the device, and the function synchronises
before it returns, so a timing of it is the GPU's work. ``init`` (a list of (weight,
bias) pairs in ``nn.Linear``'s layout) and ``perms`` (one permutation of the points per
epoch) replace the seed's own, for comparisons with other implementations.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SIZES = (2, 5, 5, 5, 5, 1)


def make_model(act: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        dense = nn.Linear(n_in, n_out)
        nn.init.normal_(dense.weight, 0.0, 1.0)  # Keras RandomNormal(0, 1)
        nn.init.zeros_(dense.bias)
        layers.append(dense)
        if i < len(SIZES) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch: int,
          device: str = "cpu", init: list | None = None, perms=None
          ) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    # (copies: vgrad's loaded datasets are read-only, torch tensors are writable)
    xt = torch.tensor(np.array(x, dtype=np.float32), device=device)
    yt = torch.tensor(np.array(y, dtype=np.float32), device=device)
    model = make_model()
    dense = [m for m in model if isinstance(m, nn.Linear)]
    if init is not None:
        with torch.no_grad():
            for d, (w, b) in zip(dense, init, strict=True):
                d.weight.copy_(torch.as_tensor(w))
                d.bias.copy_(torch.as_tensor(b))
    model.to(device)
    # Keras's defaults; PyTorch adds eps outside the square root, Keras inside.
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.BCEWithLogitsLoss()
    n, steps = len(xt), len(xt) // batch
    L = len(dense)
    step_stats = torch.zeros(epochs * steps, 6 * L + 2, device=device)
    epoch_stats = torch.zeros(epochs, 2 + 2 * L, device=device)
    t = 0
    for e in range(epochs):
        # (drawn on the CPU's generator on every device: the same shuffles everywhere)
        perm = (torch.randperm(n) if perms is None else torch.as_tensor(perms[e])).to(device)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx])[:, 0], yt[idx])
            loss.backward()
            with torch.no_grad():
                rows = []
                for d in dense:
                    g = d.weight.grad
                    rows.append(torch.stack([g.mean(), g.std(unbiased=False), g.norm(),
                                             g.abs().mean(), g.abs().max(), d.bias.grad.norm()]))
                grads = [p.grad for p in model.parameters()]
                total = torch.sqrt(sum((g * g).sum() for g in grads))
                step_stats[t] = torch.cat([loss.detach()[None], total[None], *rows])
            opt.step()
            t += 1
        with torch.no_grad():
            logits = model(xt)[:, 0]
            weights = torch.stack([torch.stack([d.weight.mean(), d.weight.std(unbiased=False)])
                                   for d in dense]).ravel()
            epoch_stats[e] = torch.cat([loss_fn(logits, yt)[None],
                                        ((logits > 0) == (yt > 0.5)).float().mean()[None],
                                        weights])
    if xt.is_cuda:
        torch.cuda.synchronize(xt.device)
    return {"steps": step_stats.cpu().numpy(), "epochs": epoch_stats.cpu().numpy()}
