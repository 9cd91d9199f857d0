"""How the images of one optimizer step split over ranks and micro-batches (no Paddle here:
the command lines describe a plan before loading it)."""

from utils.errors import UserError


def micro_batch(batch_size: int, accum_steps: int, ranks: int,
                where: str = "data.batch_size") -> int:
    """Images per rank and micro-batch: ``batch_size`` (the images of one optimizer step, all
    ranks together) split over ``ranks`` and ``accum_steps`` micro-batches, exactly."""
    parts = ranks * accum_steps
    if batch_size % parts:
        raise UserError(f"{where}={batch_size} does not split into {ranks} rank(s) x "
                        f"train.accum_steps={accum_steps} equal micro-batches; make it a "
                        f"multiple of {parts} or change train.accum_steps")
    return batch_size // parts
