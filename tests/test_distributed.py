"""Two CPU processes (gloo): loss and gradients equal a single process on the same global batch, and
`torchrun --nproc_per_node=2 ... train` trains, checkpoints once, and resumes exactly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import fake_third, tiny_config
from threetowers import create_model
from threetowers.core.distributed import DistInfo, all_mean, wrap_model
from threetowers.training.trainer import forward_backward
from train_helpers import FAST

HELPER = Path(__file__).with_name("train_helpers.py")
# (method, loss, grad_accum, model.third.heads); with heads=none third_f and third_g are one tensor, gathered once.
CASES = [("3t", "softmax", 1, "per_term"), ("3t", "sigmoid", 1, "per_term"), ("clip", "softmax", 2, "none"),
         ("3t", "softmax", 1, "none")]
N = 8  # global batch


def setup(method: str, kind: str, heads: str):
    """The same model and global batch in every process."""
    torch.manual_seed(0)
    cfg = tiny_config(method, f"loss.kind={kind}", f"model.third.heads={heads}")
    model = create_model(cfg, third=fake_third() if method != "clip" else None)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.rand(N, 3, 16, 16, generator=g), "tokens": torch.randint(2, 64, (N, 12), generator=g)}
    batch["tokens"][:, -1] = 1
    return model, batch


def loss_and_grads(model, batch, grad_accum, info=None):
    info = info or DistInfo(0, 1, 0, torch.device("cpu"), owns_group=False)
    model.loss.distribute(info.rank, info.world_size)  # as the training job does: gather over the ranks
    stats = forward_backward(wrap_model(model, info), batch, grad_accum, torch.device("cpu"), "fp32")
    loss = all_mean(stats["loss"].reshape(1), info)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, 0, torch.device("cpu"), owns_group=False)
        results = []
        for method, kind, accum, heads in CASES:
            model, batch = setup(method, kind, heads)
            per = N // world
            local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
            results.append(loss_and_grads(model, local, accum, info))
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    for (method, kind, accum, heads), (loss2, grads2) in zip(CASES, results):
        # One process, same global batch. With grad_accum each micro-batch is its own contrastive batch.
        model, batch = setup(method, kind, heads)
        if accum > 1:  # micro-batch i holds rows i of every rank's share, as under DDP
            per, micro = N // 2, N // 2 // accum
            order = [r * per + i * micro + j for i in range(accum) for r in range(2) for j in range(micro)]
            batch = {k: v[order] for k, v in batch.items()}
        loss1, grads1 = loss_and_grads(model, batch, accum)
        assert torch.allclose(loss1, loss2, rtol=1e-5, atol=1e-6), (method, kind, heads, loss1, loss2)
        assert grads1.keys() == grads2.keys() and len(grads1) > 10
        for name in grads1:
            # fp32 sums in another order: the error scales with the tensor's largest entries, not each entry.
            g1, g2 = grads1[name], grads2[name]
            tol = 2e-5 * g1.abs().max().item() + 1e-7
            assert (g1 - g2).abs().max().item() <= tol, (method, kind, heads, name, (g1 - g2).abs().max().item(), tol)
        assert not any(name.startswith("third.") for name in grads1)


def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    runner = Path(sys.executable).with_name("torchrun")
    cmd = [str(runner), "--standalone", "--nproc_per_node=2", str(HELPER), "train", "tiny", *FAST,
           f"train.output_dir={out}", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_torchrun_two_processes_train_and_resume_exactly(tmp_path):
    full = tmp_path / "full"
    first = torchrun(full)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("train done") == 1  # only rank 0 logs
    state = torch.load(full / "checkpoints/step_0000006/train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank's own stream

    # A second run that finds only the step-2 checkpoint resumes there, on both ranks, and ends
    # with the same weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints/step_0000002", resumed / "checkpoints/step_0000002")
    second = torchrun(resumed)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "at step 2" in second.stdout
    a, b = load_file(str(full / "model/model.safetensors")), load_file(str(resumed / "model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
