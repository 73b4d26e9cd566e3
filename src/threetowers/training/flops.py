"""Model FLOPs per training pair, counted from the model itself, and utilisation against a peak.

`train_flops_per_pair` runs one forward and backward of 8 rows of the first batch under PyTorch's
`FlopCounterMode`, which counts the FLOPs of every matmul, convolution and attention (2 per
multiply-add) that the towers, heads and loss execute, backward included. That is the usual
"model FLOPs" (as in the PaLM paper's MFU): what the model needs, not what the hardware did, so
activation checkpointing's recomputation does not count, and a frozen h counts only where it runs
(online: its forward; cached: nothing). Elementwise work (norms, activations, softmax) is not
counted, as is usual. For a transformer tower this is close to 6 × parameters × tokens plus the
attention's 12 × depth × tokens² × width per pair.

    MFU = flops_per_pair × pairs/s per device / train.peak_flops
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_ATEN = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# PyTorch counts SDPA's CUDA kernels but not the CPU's fused kernel: the same formula for it.
_CPU_ATTENTION = {_ATEN._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                  _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def train_flops_per_pair(model: nn.Module, batch: dict, device: torch.device) -> float:
    """FLOPs of one training step per pair, counted on 8 rows of `batch` (forward + backward).

    (On the CPU the text tower skips columns that are padding in every row, so the count follows
    the rows' caption lengths; 8 rows keep that close to the batch's average.)

    Runs in eval mode (batch norms' running statistics are not touched) and leaves no gradients.
    Under torch.distributed the loss gathers other ranks' rows, which every rank does in step here."""
    rows = min(8, next(len(v) for v in batch.values() if isinstance(v, torch.Tensor)))
    small = {k: v[:rows] for k, v in batch.items()}
    small = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in small.items()}
    was_training = model.training
    saved = [p.grad for p in model.parameters()]
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
            model(small)["loss"].backward()
    finally:
        for p, g in zip(model.parameters(), saved):
            p.grad = g
        model.train(was_training)
    return counter.get_total_flops() / rows


def utilisation(flops_per_pair: float, pairs_per_s_per_device: float, peak_flops: float) -> dict[str, float]:
    """The logged figures: achieved TFLOP/s per device and, with a peak, the MFU."""
    achieved = flops_per_pair * pairs_per_s_per_device
    out = {"perf/tflops_per_device": achieved / 1e12}
    if peak_flops > 0:
        out["perf/mfu"] = achieved / peak_flops
    return out
