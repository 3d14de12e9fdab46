"""The full K-ticket loop written with RTLPruner's public steps, in a plain PyTorch loop.

Three tickets in one CNN, one per group of digit classes (sklearn's 8x8 digits, offline): each ticket is searched
on its own subset with torch-pruning's schedule and Taylor importance, then all tickets are retrained jointly
with masked updates and exported as three smaller models. Runs in seconds on a CPU.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl

torch.manual_seed(0)
digits = load_digits()
x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y_all = torch.tensor(digits.target)
groups = [(0, 1, 2), (3, 4, 5, 6), (7, 8, 9)]          # one ticket per group of classes
subsets = {k: DataLoader(TensorDataset(x_all[sum(y_all == c for c in g).bool()],
                                       y_all[sum(y_all == c for c in g).bool()]), batch_size=64, shuffle=True)
           for k, g in enumerate(groups)}

model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
example_inputs = torch.randn(1, 1, 8, 8)

pruner = rtl.RTLPruner(model, example_inputs, num_tickets=len(groups),
                       importance=tp.importance.GroupTaylorImportance(),
                       pruning_ratio=0.5, iterative_steps=3, ignored_layers=[model[-1]])
routed = pruner.routed

for k, loader in subsets.items():
    pruner.begin(k)                                    # ticket k starts from the rewind weights θ0
    while not pruner.ticket_done():
        pruner.rewind()                                # IMP with rewinding: every round trains from θ0
        opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9)
        for x, y in loader:                            # train ticket k on its own subset
            opt.zero_grad()
            F.cross_entropy(routed(x, route=k), y).backward()
            opt.step()
        pruner.step()                                  # Taylor ranks with the gradients of ticket k's data
search = pruner.finish_search()                        # all K tickets; the weights are back at θ0

rtl.joint_retrain(routed, subsets, optimizer=torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9),
                  epochs=3, progress=False)            # masked updates: ticket k's step touches only ticket k
routed.eval()
for k, g in enumerate(groups):
    keep = sum(y_all == c for c in g).bool()
    acc = (routed(x_all[keep], route=k).argmax(1) == y_all[keep]).float().mean()
    slim = rtl.export_ticket(routed, k)
    params = sum(p.numel() for p in slim.parameters())
    print(f"ticket {k} classes {g}: accuracy {acc:.3f}, weight sparsity {pruner.ticket_sparsity(k):.2f}, "
          f"exported {params} parameters (dense {sum(p.numel() for p in model.parameters())})")
