"""The benchmark grid: every combination of the values given per axis is a row (a dict of settings)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

ZERO_CHOICES = ("0", "1", "2", "2_offload", "3")  # 0: plain DDP
# Allowed values of the axes that take a fixed set; "checkpoint" takes off, all or block names.
# "fusion" also takes `yolov5face`: the YOLOv5-Face baseline (`model.neck=yolov5face`, no GD fusion).
CHOICES = {
    "fusion": ("full", "efficient", "yolov5face"),
    "attention": ("sdpa", "explicit"),
    "precision": ("fp32", "bf16"),
    "zero": ZERO_CHOICES,
    "channels_last": ("off", "on"),
    "compile": ("off", "on"),
    "overlap_comm": ("json", "off", "on"),
}
# DeepSpeed's communication settings, for ZeRO rows only: `json` keeps the stage's ds_configs/ file.
# bucket: reduce_bucket_size and allgather_bucket_size in elements (e.g. 5e6); overlap_comm: off or on.
DS_AXES = {"bucket": "json", "overlap_comm": "json"}
AXES = ("global_batch", "fusion", "attention", "precision", "checkpoint", "zero", "channels_last", "compile", *DS_AXES)


class GridError(ValueError):
    """A grid that cannot run (a value that is not allowed, a config every row rejects); the message
    names the flag or key and the choices."""


def parse_axes(values: Mapping[str, str]) -> dict[str, list]:
    """Comma lists per axis (as given on the command line) -> lists of values, checked."""
    given = {axis: values[axis] if axis not in DS_AXES else values.get(axis, DS_AXES[axis]) for axis in AXES}
    axes = {axis: [v for v in text.split(",") if v] for axis, text in given.items()}
    for axis, choices in CHOICES.items():
        bad = [v for v in axes[axis] if v not in choices]
        if bad:
            raise GridError(f"--{axis.replace('_', '-')}: unknown {bad[0]!r}; choose from {', '.join(choices)}")
    if not all(b.isdigit() and int(b) > 0 for b in axes["global_batch"]):
        raise GridError(f"--global-batch takes positive integers, got {','.join(axes['global_batch'])}")
    axes["global_batch"] = [int(b) for b in axes["global_batch"]]
    bad = [b for b in axes["bucket"] if b != "json" and not _positive_number(b)]
    if bad:
        raise GridError(f"--bucket takes `json` or element counts such as 5e6 or 50000000, got {bad[0]!r}")
    return axes


def _positive_number(text: str) -> bool:
    try:
        return float(text) >= 1
    except ValueError:
        return False


def expand_grid(axes: Mapping[str, Sequence]) -> list[dict]:
    """Rows for every combination; attention varies only for the full variant (`-` for the others), the
    DeepSpeed settings only for ZeRO rows (`-` for DDP)."""
    rows, seen = [], set()
    for values in itertools.product(*(axes[a] for a in AXES)):
        batch, fusion, attention, precision, ckpt, zero, cl, compiled, bucket, overlap = values
        row = {
            "global_batch": batch,
            "fusion": fusion,
            "attention": attention if fusion == "full" else "-",
            "precision": precision,
            "checkpoint": ckpt,
            "zero": zero,
            "channels_last": cl == "on",
            "compile": compiled == "on",
            "bucket": "-" if zero == "0" else bucket,
            "overlap_comm": "-" if zero == "0" else overlap,
        }
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def network(row: dict) -> str:
    """The network a row trains: `full/<attention>`, `efficient` or `yolov5face`."""
    return f"{row['fusion']}/{row['attention']}" if row["fusion"] == "full" else row["fusion"]


def label(row: dict) -> str:
    """A short unique name, e.g. `full/sdpa bf16 ckpt=all z2 cl compile b40`, `yolov5face fp32 ckpt=off ddp b2`."""
    parts = [
        network(row),
        row["precision"],
        f"ckpt={row['checkpoint']}",
        f"z{row['zero']}" if row["zero"] != "0" else "ddp",
    ]
    parts += ["cl"] * row["channels_last"] + ["compile"] * row["compile"]
    if row.get("bucket", "-") not in ("-", "json"):
        parts.append(f"bucket={row['bucket']}")
    if row.get("overlap_comm", "-") in ("off", "on"):
        parts.append(f"overlap={row['overlap_comm']}")
    parts.append(f"b{row['global_batch']}")
    return " ".join(parts)


def overrides(row: dict, common: dict) -> list[str]:
    """The `key=value` overrides that turn the run config into this row's (a `yolov5face` row sets
    `model.neck=yolov5face` and no fusion or attention; the others `model.neck=gd`)."""
    ckpt = [] if row["checkpoint"] == "off" else row["checkpoint"].split("+")
    if row["fusion"] == "yolov5face":
        model = ["model.neck=yolov5face"]
    else:
        model = ["model.neck=gd", f"model.fusion={row['fusion']}"]
    model.append(f"model.checkpoint=[{','.join(ckpt)}]")
    if row["fusion"] == "full":
        model.append(f"model.attention={row['attention']}")
    return [
        *model,
        f"model.size={common['size']}",
        f"model.img_size={common['img']}",
        f"train.global_batch={row['global_batch']}",
        f"train.precision={row['precision']}",
        f"train.channels_last={str(row['channels_last']).lower()}",
        f"train.compile={str(row['compile']).lower()}",
        *([f"train.micro_batch={common['micro_batch']}"] if common["micro_batch"] else []),
        *common["overrides"],
    ]
