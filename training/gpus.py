"""The GPUs a run plan is priced on (AI Studio's cards), with the source of every number.

Peak rates are the vendors' published dense rates; what a training step reaches is a
fraction of them, ``EFFICIENCY``, one factor for all cards until users' preflight reports
(which print the plan's estimate beside the measurement) correct it.
"""

# name: (memory bytes, peak FLOP/s in float32, peak FLOP/s in float16/bfloat16 tensor cores)
GPUS = {
    # NVIDIA Tesla V100 datasheet (SXM2): 15.7 TFLOPS fp32, 125 TFLOPS tensor (fp16); 16/32 GB.
    "V100-16GB": (16 * 2 ** 30, 15.7e12, 125e12),
    "V100-32GB": (32 * 2 ** 30, 15.7e12, 125e12),
    # NVIDIA A100 datasheet: 19.5 TFLOPS fp32, 312 TFLOPS fp16/bf16 tensor (dense); 40 GB.
    "A100-40GB": (40 * 2 ** 30, 19.5e12, 312e12),
}
# V100 has no bfloat16 tensor cores: a bf16 run there falls back to float32 (training/amp.py).
BF16_CARDS = ("A100-40GB",)

# The fraction of the peak a training step reaches. Derived from the public Paddle
# reproductions of the R-Drop authors' recipe (README.md, What to expect): 29 and 54 V100-hours
# for 5,120,000 images of about 667 GFLOPs each (deit-B/16 at 384: 6 x 111.2 GFLOPs forward
# for an R-Drop step) in fp16: 3.4e18 / (29 h x 125e12) = 0.26, / (54 h x 125e12) = 0.14.
EFFICIENCY = 0.2

# Memory a GPU loses before the run's tensors: the CUDA context and Paddle's allocator
# reserve (about 0.5-1 GB on the V100 and A100; 1 GB is assumed).
RESERVED_BYTES = 2 ** 30


def precision_on(gpu: str, amp: str) -> str:
    """The precision a run with ``train.amp = amp`` (``off``, ``fp16``, ``bf16``) trains in on
    ``gpu``: bf16 falls back to float32 (``off``) on a card without it."""
    return "off" if amp == "bf16" and gpu not in BF16_CARDS else amp


def peak_flops(gpu: str, precision: str) -> float:
    """The peak FLOP/s of ``gpu`` for a run with ``train.amp = precision``."""
    _, fp32, half = GPUS[gpu]
    return fp32 if precision_on(gpu, precision) == "off" else half
