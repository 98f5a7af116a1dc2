"""The CLIP finetuning objective: InfoNCE against a hand computation, and the gathered path of two
gloo processes equal to one process holding the whole batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scan_model.finetune.objective import (
    MAX_LOGIT_SCALE,
    clamp_logit_scale,
    contrastive_loss,
    distributed_contrastive_loss,
)


def test_infonce_equals_a_hand_computation():
    # Unit vectors at 0 and 90 degrees; scale e^0 = 1, so the logits are the cosines.
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos: image0.text0 = 1, image0.text1 = 1/sqrt2, image1.text0 = 0, image1.text1 = 1/sqrt2
    c = 1 / math.sqrt(2)
    i2t = (-(1 - math.log(math.e + math.exp(c))) - (c - math.log(1 + math.exp(c)))) / 2
    t2i = (-(1 - math.log(math.e + 1)) - (c - math.log(math.exp(c) + math.exp(c)))) / 2
    expected = (i2t + t2i) / 2
    assert contrastive_loss(image, text, torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)


def test_logit_scale_is_clamped_to_ln_100():
    scale = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(scale)
    assert scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    scale.data.fill_(-1.0)
    clamp_logit_scale(scale)
    assert scale.item() == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, image, text, scale, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = image.shape[0] // world
        local_image = image[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        local_text = text[rank * n:(rank + 1) * n].clone()
        loss = distributed_contrastive_loss(local_image, local_text, scale)
        loss.backward()
        results[rank] = (loss.item(), local_image.grad.clone())
    finally:
        dist.destroy_process_group()


def test_two_processes_compute_the_single_process_loss_and_local_gradients():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    scale = torch.tensor(math.log(1 / 0.07))
    whole = image.clone().requires_grad_(True)
    single = contrastive_loss(whole, text, scale)
    single.backward()
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, _free_port(), image, text, scale, results), nprocs=2, join=True)
    for rank in range(2):
        loss, grad = results[rank]
        assert loss == pytest.approx(single.item(), rel=1e-6)
        torch.testing.assert_close(grad, whole.grad[rank * 3:(rank + 1) * 3], rtol=1e-5, atol=1e-6)
