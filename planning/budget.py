"""The front pages' budget table: the cost of each shipped GPU config on each GPU of
:mod:`planning.gpus`, from :func:`planning.plan.plan`, in English or Chinese.

  python -m planning.budget        # the table of README.md
  python -m planning.budget zh     # the table of README_cn.md
"""

import os
import sys

from planning.gpus import GPUS
from planning.plan import plan
from utils import cli
from utils.errors import UserError

# The shipped GPU configs the table prices, and the GPU-hours its last lines count runs in.
GPU_CONFIGS = ("configs/rdrop_deit_b_384_cifar100.yaml", "configs/rdrop_paper_recipe.yaml",
               "configs/rdrop_deit_b_384_folder.yaml")
BUDGET_HOURS = 30
PAGES = {"en": "README.md", "zh": "README_cn.md"}
WORDS = {
    "en": {
        "header": "| config | optimizer steps | images | {gpus} | disk |",
        "your data": "your data", "fits": "fits", "does not fit": "does not fit",
        "does not fit either": "does not fit either", "separator": ", ", "list": "; ",
        "hours": "≈ {hours:.3g} h ({low:.3g}-{high:.3g})",
        "runs": "- {hours} GPU-hours: `{name}` {times}.",
        "times": "{count:.2g} times on {a_gpu}",
        "less than once": "not once on {a_gpu} ({count:.2g} of a run)",
        "once": "once on {a_gpu}",
        "until": "- `{name}`: stages that reach their `until` target stop early; its steps, "
                 "images and hours are those of the full length.",
        "nothing fits": "- `{name}` on {a_gpu}: not even one image fits; use a larger card.",
        "accumulate": "- `{name}` on {a_gpu}: micro-batches of at most {largest} images fit: "
                      "`-o train.accum_steps={accum}` keeps the images per step and the hours",
        "recompute": "; `-o model.recompute=true` keeps the micro-batch ({memory}, {fits}, "
                     "≈ {hours:.3g} h)",
        "source": "Hours: training, validations and the final test, an estimate from published "
                  "runs of ViT-B/384 on each card and precision (`planning/gpus.py` cites "
                  "them), not measured by this project; the range spans the slowest and the "
                  "fastest of them. Memory for Paddle 3.3 or newer (`requirements.txt`), which "
                  "fuses attention on a V100 too; with Paddle 2.6 - 3.2 a V100 has no fused kernel "
                  "and `--dry-run` there sizes the attention matrix ({older}).",
        "older": "`{name}` on {a_gpu}: {memory}",
        "older fix": "`{name}` on {a_gpu}: {memory}, `-o train.accum_steps={accum}` fits",
    },
    "zh": {
        "header": "| 配置 | 优化步数 | 图片数 | {gpus} | 磁盘 |",
        "your data": "取决于你的数据", "fits": "放得下", "does not fit": "放不下",
        "does not fit either": "仍放不下", "separator": "，", "list": "；",
        "hours": "≈ {hours:.3g} 小时（{low:.3g}-{high:.3g}）",
        "runs": "- {hours} 个 GPU 小时能跑几次：`{name}` {times}。",
        "times": "在 {gpu} 上够跑约 {count:.2g} 次",
        "less than once": "在 {gpu} 上跑不完一次（约 {count:.2g} 次）",
        "once": "在 {gpu} 上够跑约 {count:.2g} 次",
        "until": "- `{name}`：达到 `until` 目标的阶段会提前结束；表中的步数、图片数和时长按完整长度计算。",
        "nothing fits": "- `{name}` 在 {gpu} 上：一张图片都放不下，请换更大的卡。",
        "accumulate": "- `{name}` 在 {gpu} 上，微批次最多放得下 {largest} 张图片。"
                      "加 `-o train.accum_steps={accum}`，每步的图片数和时长都不变",
        "recompute": "；或者加 `-o model.recompute=true`，微批次不变（{memory}，{fits}，"
                     "≈ {hours:.3g} 小时）",
        "source": "时长：训练、验证和最后的测试，按已发表的 ViT-B/384 在各卡、各精度上的训练记录"
                  "估算（出处见 `planning/gpus.py`），本项目没有实测；区间取这些记录中最慢和最快的。"
                  "显存按 Paddle 3.3 及以上（`requirements.txt`）估算，"
                  "V100 上同样走融合注意力；Paddle 2.6 到 3.2 在 V100 上没有融合算子，"
                  "这时 `--dry-run` 会把注意力矩阵算进显存（{older}）。",
        "older": "`{name}` 在 {gpu} 上：{memory}",
        "older fix": "`{name}` 在 {gpu} 上：{memory}，"
                     "加 `-o train.accum_steps={accum}` 可放下",
    },
}
# The Paddle the table is sized for (requirements.txt: the newest), and an older one users
# also run (2.6 - 3.2 size a V100 alike: no fused kernel there).
PADDLE_VERSION, OLDER_PADDLE_VERSION = (3, 3, 1), (2, 6, 2)


def _how_often(count):
    """The words that say how many runs ``count`` is: less than one, one or more."""
    return "less than once" if count < 1 else "once" if f"{count:.2g}" == "1" else "times"


def _a(gpu):
    """``gpu`` with its English article: a V100-16GB, an A100-40GB."""
    return ("an " if gpu[0] in "AEFHILMNORSX" else "a ") + gpu


def _gib(count):
    return f"{count / 2 ** 30:.3g} GiB"


def budget_markdown(language: str = "en", paths: tuple[str, ...] = GPU_CONFIGS) -> list[str]:
    """The budget table's lines for the configs at ``paths``, in ``language`` (``en``, ``zh``)."""
    from training.config import load_config

    words = WORDS[language]
    lines = [words["header"].format(gpus=" | ".join(GPUS)), "|---" * (4 + len(GPUS)) + "|"]
    notes, older = [], []
    for path in paths:
        cfg, name = load_config(path), os.path.basename(path)
        cost = plan(cfg, PADDLE_VERSION)
        bound = "≤ " if any(s["upper_bound"] for s in cost["stages"]) else ""
        cells = []
        for gpu in GPUS:
            hours, memory = cost["hours"][gpu], _gib(cost["memory_bytes"][gpu])
            fit = words["fits"] if cost["fits"][gpu] else words["does not fit"]
            when = "" if hours is None else words["hours"].format(
                hours=hours, low=cost["hours_range"][gpu][0], high=cost["hours_range"][gpu][1])
            cells.append(words["separator"].join(filter(None, [when, memory, fit])))
            if gpu in cost["fixes"]:
                notes.append(_what_fits(name, gpu, cost["fixes"][gpu], words))
        steps, images = cost["total_optimizer_steps"], cost["total_images"]
        lines.append(f"| `{name}` | {bound + format(steps, ',') if steps else words['your data']} "
                     f"| {bound + format(images, ',') if images else words['your data']} | "
                     + " | ".join(cells) + f" | {_gib(cost['disk_bytes'])} |")
        if bound:
            notes.append(words["until"].format(name=name))
        if images:
            counts = {gpu: BUDGET_HOURS / cost["hours"][gpu] for gpu in GPUS}
            times = words["separator"].join(
                words[_how_often(counts[gpu])].format(
                    count=counts[gpu], gpu=gpu, a_gpu=_a(gpu)) for gpu in GPUS)
            notes.append(words["runs"].format(hours=BUDGET_HOURS, name=name, times=times))
        previous = plan(cfg, OLDER_PADDLE_VERSION)
        for gpu in GPUS:
            fix = previous["fixes"].get(gpu, {}).get("accum_steps")
            if previous["memory_bytes"][gpu] != cost["memory_bytes"][gpu]:
                older.append(words["older fix" if fix else "older"].format(
                    name=name, gpu=gpu, a_gpu=_a(gpu), memory=_gib(previous["memory_bytes"][gpu]), accum=fix))
    source = words["source"].format(older=words["list"].join(older))
    return lines + [""] + notes + ["", source]


def _what_fits(name, gpu, fix, words):
    """The note on what makes config ``name`` fit on ``gpu`` (the plan's ``fixes``)."""
    if fix["largest_micro_batch"] < 1:
        return words["nothing fits"].format(name=name, gpu=gpu, a_gpu=_a(gpu))
    text = words["accumulate"].format(name=name, gpu=gpu, a_gpu=_a(gpu), largest=fix["largest_micro_batch"],
                                      accum=fix["accum_steps"])
    recompute = fix["recompute"]
    if recompute:
        fits = words["fits"] if recompute["fits"] else words["does not fit either"]
        text += words["recompute"].format(memory=_gib(recompute["memory_bytes"]), fits=fits,
                                          hours=recompute["hours"] or 0)
    return text + ("." if words is WORDS["en"] else "。")


def main(argv: list[str]) -> int:
    """Print the table in the language ``argv`` names (English by default)."""
    language = argv[0] if argv else "en"
    if language not in WORDS:
        raise UserError(f"no budget table in {language!r}; use one of {', '.join(WORDS)}")
    print("\n".join(budget_markdown(language)))
    return 0


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]))
