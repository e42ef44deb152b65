"""Fixtures: a copy-task-trained tiny Llama; save_teacher writes an untrained tiny Llama with the byte tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import copy_batch, tiny_llama


@pytest.fixture(scope="session")
def copy_teacher():
    """A tiny Llama trained on the copy task, so that its attention layers carry something to initialise from."""
    teacher = tiny_llama(vocab_size=64)
    teacher.train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    try:
        for _ in range(300):
            ids = copy_batch(generator, 16)
            loss = teacher(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return teacher.eval().requires_grad_(False)
