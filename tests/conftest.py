"""Shared pytest setup: one intra-op thread per xdist worker (the suite runs `-n 2` on 2 cores; more threads
per worker only oversubscribe the CPU and slow every test down)."""

import torch

torch.set_num_threads(1)
