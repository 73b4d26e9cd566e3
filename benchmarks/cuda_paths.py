"""The code paths that only a GPU takes, checked end to end through the command line, for a lent device.

    python benchmarks/cuda_paths.py                     # on a GPU machine (about 3 minutes on one GPU)
    python benchmarks/cuda_paths.py --device cpu        # the same checks on the CPU: the script's own test
    python benchmarks/cuda_paths.py --out cuda_paths.json

Each check prints `ok` or `FAIL` with what it measured, and the JSON holds every figure:

- `stop`: SIGTERM to a training run in the middle: exit status 75 after a checkpoint. On a GPU the
  stop flag of step s is read after step s + 1 has been queued (training/stopping.py), so the run
  stops at most two steps after the step under way when the signal came; on the CPU at most one.
- `resume`: the same command again finishes the run (exit 0) from that checkpoint.
- `ema`: a run with `train.ema_decay` keeps the EMA in its checkpoint and its final model is the EMA.
- `embed_amp`: `threetowers embed --amp` (bf16 autocast) against fp32 on the same device: the
  cosine of each pair of embeddings (min over 256 world images) at least 0.99.
- `demo_jobs`: a tiny `threetowers demo` with two runs at once in worker processes on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ["train.steps=400", "train.log_every=1", "train.checkpoint_every=1000", "eval.tasks=[]", "train.threads=2"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "threetowers", *args]


def check_stop_and_resume(work: Path, device: str) -> dict:
    out = work / "stop"
    argv = cli("train", "tiny", f"train.output_dir={out}", f"train.device={device}", *TINY)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    for line in proc.stdout:  # step lines come every step: signal after step 50
        found = re.match(r"step (\d+) ", line)
        if found:
            seen = int(found[1])
            if seen >= 50:
                proc.send_signal(signal.SIGTERM)
                break
    rest = proc.stdout.read()
    proc.wait(timeout=300)
    stopped = re.search(r"stopped on SIGTERM after step (\d+)", rest)
    step = int(stopped[1]) if stopped else None
    lag = 2 if device == "cuda" else 1
    stop = {"exit": proc.returncode, "signal_after_logged_step": seen, "stopped_after_step": step,
            "ok": proc.returncode == 75 and step is not None and seen <= step <= seen + lag + 1}
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    done = re.search(r"train done: step (\d+)", again.stdout + again.stderr)
    resume = {"exit": again.returncode, "final_step": int(done[1]) if done else None,
              "ok": again.returncode == 0 and done is not None and int(done[1]) == 400}
    return {"stop": stop, "resume": resume}


def check_ema(work: Path, device: str) -> dict:
    import torch
    from safetensors.torch import load_file

    out = work / "ema"
    run = subprocess.run(cli("train", "tiny", f"train.output_dir={out}", f"train.device={device}", "train.ema_decay=0.9",
                             *[o for o in TINY if not o.startswith("train.steps=")], "train.steps=40",
                             "train.checkpoint_every=40"), capture_output=True, text=True, timeout=600)
    checkpoint = sorted((out / "checkpoints").glob("step_*"))[-1] if (out / "checkpoints").is_dir() else None
    ema = load_file(checkpoint / "ema.safetensors") if checkpoint and (checkpoint / "ema.safetensors").is_file() else {}
    final = load_file(out / "model" / "model.safetensors") if (out / "model" / "model.safetensors").is_file() else {}
    shared = [k for k in ema if k in final]
    equal = bool(shared) and all(torch.equal(ema[k].float(), final[k].float()) for k in shared)
    return {"ema": {"exit": run.returncode, "tensors": len(shared), "final_model_is_the_ema": equal,
                    "ok": run.returncode == 0 and equal}}


def check_embed_amp(work: Path, device: str) -> dict:
    import numpy as np

    from threetowers.world import World
    from threetowers.config import load_config

    model = work / "stop" / "model"
    images = work / "images"
    if not images.is_dir():
        world = World(load_config("tiny").data.world)
        pairs = world.pairs("train")
        from PIL import Image
        images.mkdir(parents=True)
        for i in range(256):
            Image.fromarray(pairs.images[i]).save(images / f"{i:03d}.png")
    found = {}
    for amp in (False, True):
        out = work / f"emb_{'amp' if amp else 'fp32'}"
        run = subprocess.run(cli("embed", str(model), str(images), "--out", str(out), "--device", device,
                                 "--dtype", "float32", *(["--amp"] if amp else [])), capture_output=True, text=True,
                             timeout=600)
        if run.returncode:
            return {"embed_amp": {"exit": run.returncode, "error": run.stderr[-500:], "ok": False}}
        found[amp] = np.concatenate([np.load(p) for p in sorted(out.glob("*.npy"))]).astype(np.float64)
    cosine = (found[False] * found[True]).sum(1) / (np.linalg.norm(found[False], axis=1) * np.linalg.norm(found[True], axis=1))
    return {"embed_amp": {"images": len(cosine), "min_cosine": float(cosine.min()), "ok": float(cosine.min()) >= 0.99}}


def check_demo_jobs(work: Path, device: str) -> dict:
    run_settings = ["model.embed_dim=16", "model.image.image_size=24", "model.text.vocab_size=300",
                    "model.text.context_length=16", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
                    "data.world.num_pairs=256", "data.world.image_size=24", "train.steps=6", "train.batch_size=32",
                    "optim.warmup_steps=2", "train.threads=1", f"train.device={device}", "eval.num_images=60",
                    "eval.retrieval_images=30", "eval.fewshot_shots=[2]", "eval.fewshot_seeds=[0]",
                    "eval.mixing_alphas=[0.0,1.0]"]
    pretrain = ("pretrain_overrides=[model.image.image_size=24,train.steps=4,train.batch_size=32,pretrain.num_images=128,"
                f"pretrain.num_heldout=56,train.threads=1,train.device={device}]")
    t0 = time.perf_counter()
    run = subprocess.run(cli("demo", "--quick", f"output_dir={work / 'demo'}", "seeds=[0]", "thirds=[object]", "jobs=2",
                             "ceiling_shots=3", pretrain, *[a for s in run_settings for a in ("--run", s)]),
                         capture_output=True, text=True, timeout=600)
    results = work / "demo" / "results.json"
    runs = json.loads(results.read_text())["runs"] if results.is_file() else []
    return {"demo_jobs": {"exit": run.returncode, "runs": len(runs), "seconds": round(time.perf_counter() - t0, 1),
                          "ok": run.returncode == 0 and len(runs) == 3,
                          **({"error": run.stderr[-500:]} if run.returncode else {})}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--work", type=Path, default=Path("cuda_paths_work"), help="a scratch folder (emptied first)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import shutil

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu to check the script itself", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__}
    for check in (check_stop_and_resume, check_ema, check_embed_amp, check_demo_jobs):
        t0 = time.perf_counter()
        found = check(args.work, args.device)
        for name, figures in found.items():
            print(f"{'ok  ' if figures['ok'] else 'FAIL'} {name}: "
                  + ", ".join(f"{k} {v}" for k, v in figures.items() if k != "ok"), flush=True)
        report.update(found)
        print(f"     ({check.__name__}: {time.perf_counter() - t0:.0f}s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(v["ok"] for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
