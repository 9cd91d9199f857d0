"""The front pages' budget table: the cost of each shipped GPU config on each GPU of
:mod:`training.gpus`, from :func:`training.plan.plan`, in English or Chinese.

  python -m training.budget        # the table of README.md
  python -m training.budget zh     # the table of README_cn.md
"""

import os
import sys

from training.gpus import GPUS
from training.plan import plan

# The shipped GPU configs the table prices, and the GPU-hours its last lines count runs in.
GPU_CONFIGS = ("configs/rdrop_deit_b_384_cifar100.yaml", "configs/rdrop_paper_recipe.yaml",
               "configs/rdrop_deit_b_384_folder.yaml")
BUDGET_HOURS = 30
PAGES = {"en": "README.md", "zh": "README_cn.md"}
WORDS = {
    "en": {
        "header": "| config | optimizer steps | images | {gpus} | disk |",
        "your data": "your data", "fits": "fits", "does not fit": "does not fit",
        "does not fit either": "does not fit either", "separator": ", ",
        "runs": "- {hours} GPU-hours: `{name}` {times}.",
        "times": "{count:.2g} times on a {gpu}",
        "nothing fits": "- `{name}` on a {gpu}: not even one image fits; use a larger card.",
        "what fits": "- `{name}` on a {gpu}: micro-batches of at most {largest} images fit: "
                     "`-o train.accum_steps={accum}` keeps the images per step and the hours; "
                     "`-o model.recompute=true` keeps the micro-batch ({memory}, {fits}) for "
                     "{extra:.3g} times the hours.",
    },
    "zh": {
        "header": "| 配置 | 优化步数 | 图片数 | {gpus} | 磁盘 |",
        "your data": "取决于你的数据", "fits": "放得下", "does not fit": "放不下",
        "does not fit either": "仍放不下", "separator": "，",
        "runs": "- {hours} GPU 小时：`{name}` {times}。",
        "times": "在 {gpu} 上可跑 {count:.2g} 次",
        "nothing fits": "- `{name}` 在 {gpu} 上：一张图片都放不下，请换更大的卡。",
        "what fits": "- `{name}` 在 {gpu} 上：微批次最多放得下 {largest} 张图片："
                     "`-o train.accum_steps={accum}` 保持每步的图片数和时长；"
                     "`-o model.recompute=true` 保持微批次（{memory}，{fits}），"
                     "时长为 {extra:.3g} 倍。",
    },
}


def _gib(count):
    return f"{count / 2 ** 30:.3g} GiB"


def budget_markdown(language: str = "en", paths: tuple[str, ...] = GPU_CONFIGS) -> list[str]:
    """The budget table's lines for the configs at ``paths``, in ``language`` (``en``, ``zh``)."""
    from utils.config import load_config

    words = WORDS[language]
    lines = [words["header"].format(gpus=" | ".join(GPUS)), "|---" * (4 + len(GPUS)) + "|"]
    notes = []
    for path in paths:
        cfg = load_config(path)
        cost = plan(cfg)
        bound = "≤ " if any(s["upper_bound"] for s in cost["stages"]) else ""
        cells = []
        for gpu in GPUS:
            hours, memory = cost["hours"][gpu], _gib(cost["memory_bytes"][gpu])
            fit = words["fits"] if cost["fits"][gpu] else words["does not fit"]
            cells.append(f"{bound}{hours:.3g} h, {memory}, {fit}" if hours is not None
                         else f"{memory}, {fit}")
            if not cost["fits"][gpu]:
                notes.append(_what_fits(path, cfg, gpu, cost, words))
        steps, images = cost["total_optimizer_steps"], cost["total_images"]
        name = os.path.basename(path)
        lines.append(f"| `{name}` | {bound + format(steps, ',') if steps else words['your data']} "
                     f"| {bound + format(images, ',') if images else words['your data']} | "
                     + " | ".join(cells) + f" | {_gib(cost['disk_bytes'])} |")
        if images:
            times = words["separator"].join(
                words["times"].format(count=BUDGET_HOURS / cost["hours"][gpu], gpu=gpu)
                for gpu in GPUS)
            notes.append(words["runs"].format(hours=BUDGET_HOURS, name=name, times=times))
    return lines + [""] + notes


def _what_fits(path, cfg, gpu, cost, words):
    """What makes the config at ``path`` fit on ``gpu``: more accumulation (the same hours)
    or recompute (the same micro-batch, its hours and memory from the plan)."""
    from utils.config import load_config

    stage = max(cost["stages"], key=lambda s: s["memory_bytes"][gpu])
    largest, name = stage["largest_micro_batch"][gpu], os.path.basename(path)
    if largest < 1:
        return words["nothing fits"].format(name=name, gpu=gpu)
    batch = stage["micro_batch"] * cfg.train.accum_steps
    accum = next(a for a in range(cfg.train.accum_steps, batch + 1)
                 if batch % a == 0 and batch // a <= largest)
    recompute = plan(load_config(path, ["model.recompute=true"]))
    extra = recompute["stages"][0]["flops_per_image"] / cost["stages"][0]["flops_per_image"]
    fits = words["fits"] if recompute["fits"][gpu] else words["does not fit either"]
    return words["what fits"].format(name=name, gpu=gpu, largest=largest, accum=accum,
                                     memory=_gib(recompute["memory_bytes"][gpu]), fits=fits,
                                     extra=extra)


if __name__ == "__main__":
    print("\n".join(budget_markdown(*sys.argv[1:2])))
