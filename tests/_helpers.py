"""Plain helpers shared by test modules and by subprocess scripts (importable without pytest)."""
import torch
from torch import nn

import rtl_plugin as rtl


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2 + global pool + Linear ``head`` (a classifier: output [B, num_classes])."""

    def __init__(self, width: int = 8, num_classes: int = 5, in_ch: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def half_tickets(space, K, seed=1):
    """Channel tickets keeping exactly half of every group's period (tiled over channel groups)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in space.groups:
        per = torch.zeros(K, grp.period, dtype=torch.bool)
        for k in range(K):
            per[k, torch.randperm(grp.period, generator=g)[:grp.period // 2]] = True
        masks[grp.root] = per.repeat(1, grp.ch_groups)
    return rtl.TicketSet(space, masks)
