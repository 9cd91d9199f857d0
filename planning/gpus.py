"""The GPUs a run plan is priced on (AI Studio's cards), with the source of every number.

A card's rate is its published peak for the precision the run trains in there times the
fraction of that peak (model-FLOPs utilisation, MFU) published training runs of ViT-B at
384 px reached on the same card in the same precision: a range, from the slowest to the
fastest run found, and an estimate in its middle. None of it is measured by this project;
preflight prints the estimate beside its measurement on the user's card.

FLOPs per image below are the plan's own counts (planning/plan.py): 111.2 GFLOPs for a
forward pass of ViT-B/16 or DeiT-B at 384 px, 3 forwards' worth for a training image,
6 (667 GFLOPs) for an R-Drop training image.
"""

from __future__ import annotations

from typing import Optional

from models.attention import fused_on_capability

# name: (memory bytes, peak FLOP/s in float32, peak FLOP/s in float16/bfloat16 tensor cores).
# Memory: what the cards expose to CUDA (cudaMemGetInfo's total), a little under the
# datasheet's 16/32/40 GB.
# Dense fp16/bf16 tensor-core peaks (FLOP/s) by device-name fragment, from NVIDIA's
# datasheets ("A100" before "A10": the first fragment in a device's name is its card);
# bench/throughput.py's MFU reads them for cards beyond the plan's.
HALF_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12,
              "V100": 125e12, "A10": 125e12, "T4": 65e12}
GPUS = {
    # NVIDIA Tesla V100 datasheet (SXM2): 15.7 TFLOPS fp32, 125 TFLOPS tensor (fp16); 16/32 GB.
    "V100-16GB": (int(15.78 * 2 ** 30), 15.7e12, HALF_PEAKS["V100"]),
    "V100-32GB": (int(31.75 * 2 ** 30), 15.7e12, HALF_PEAKS["V100"]),
    # NVIDIA A100 datasheet: 19.5 TFLOPS fp32, 312 TFLOPS fp16/bf16 tensor (dense); 40 GB.
    "A100-40GB": (int(39.59 * 2 ** 30), 19.5e12, HALF_PEAKS["A100"]),
}
# Compute capability (major) of each card: what decides the fused attention kernel.
CAPABILITY = {"V100-16GB": 7, "V100-32GB": 7, "A100-40GB": 8}
# V100 has no bfloat16 tensor cores: a bf16 run there falls back to float32 (training/amp.py).
BF16_CARDS = ("A100-40GB",)

# MFU (low, high) of a training step, by card family and precision ("half": fp16 or bf16
# AMP; "off": float32).
UTILISATION = {
    # zpc-666/Paddle-R-Drop (the R-Drop authors' recipe in Paddle: 10,000 steps of 512 images
    # at 384 px, one V100-32GB, fp16 O1): its training log's 18.0 s a step is
    # 512 x 667e9 / (18.0 s x 125e12) = 0.152 (its README's "2天6小时26分", 54.4 h, adds an
    # evaluation every 100 steps). DeiT (Touvron et al. 2021), the 384 px fine-tune of DeiT-B
    # on V100s with AMP: about 51 h for the same 5.12 M images, 0.149.
    ("V100", "half"): (0.14, 0.16),
    # PaddleClas's DeiT-B/384 benchmark, V100, fp32 inference: 89.7 img/s x 111.2 GFLOPs =
    # 0.64 of 15.7 TFLOPS, a training step's ceiling; a 224 px fp32 DeiT-B training log: 0.50.
    ("V100", "off"): (0.45, 0.60),
    # PLSC (PaddlePaddle), ViT-B/16 at 384 px, fp16, 8 A100s: 719 img/s, 89.9 a GPU x 333.6
    # GFLOPs = 0.096 of 312 TFLOPS; PaddleFleetX's ViT-B/16 384 px fine-tune: 99-109 img/s a
    # GPU, 0.106-0.117. An A100 is 1.6-1.9 V100s here, not the peaks' 2.5.
    ("A100", "half"): (0.10, 0.12),
    # No published float32 run of this model on an A100 was found: the V100's float32 fraction
    # of the A100's 19.5 TFLOPS (matmuls in TF32, where enabled, would be faster).
    ("A100", "off"): (0.45, 0.60),
}
SOURCE = "estimate from published runs of ViT-B/384; not measured by this project"

# Memory a GPU loses before the run's tensors: the CUDA context and Paddle's allocator
# reserve (about 0.5-1 GB on the V100 and A100; 1 GB is assumed, an estimate).
RESERVED_BYTES = 2 ** 30


def precision_on(gpu: str, amp: str) -> str:
    """The precision a run with ``train.amp = amp`` (``off``, ``fp16``, ``bf16``) trains in on
    ``gpu``: bf16 falls back to float32 (``off``) on a card without it."""
    return "off" if amp == "bf16" and gpu not in BF16_CARDS else amp


def flop_rates(gpu: str, amp: str) -> tuple[float, float, float]:
    """The FLOP/s a training step reaches on ``gpu`` with ``train.amp = amp``: (low,
    estimate, high)."""
    _, fp32, half = GPUS[gpu]
    precision = precision_on(gpu, amp)
    low, high = UTILISATION[gpu.split("-")[0], "off" if precision == "off" else "half"]
    peak = fp32 if precision == "off" else half
    return peak * low, peak * (low + high) / 2, peak * high


def fused_attention_on(gpu: str, amp: str, setting: str,
                       paddle_version: tuple[int, int, int]) -> bool:
    """Whether PPIM's attention runs through Paddle's fused kernel on ``gpu`` with that Paddle
    (``model.fused_attention = setting``; ``auto`` takes it under AMP, O1 and O2 alike),
    which keeps no attention matrix: flash attention needs compute capability 8.0 (an A100);
    a V100 has the memory-efficient kernel from Paddle 3.3 only (models/attention.py)."""
    return fused_on_capability(CAPABILITY[gpu], precision_on(gpu, amp), setting, paddle_version)


def card_of(device: str) -> Optional[str]:
    """The card of :data:`GPUS` that ``device`` is (by name and memory), or ``None``."""
    if not str(device).startswith("gpu"):
        return None
    import paddle

    name = paddle.device.cuda.get_device_name()
    memory = paddle.device.cuda.get_device_properties().total_memory
    for card, (card_memory, _, _) in GPUS.items():
        if card.split("-")[0] in name and abs(memory - card_memory) < 0.15 * card_memory:
            return card
    return None
