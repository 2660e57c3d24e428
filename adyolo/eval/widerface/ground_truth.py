"""The official WIDER FACE validation ground truth: the .mat files of the eval_tools archive.

Image ids are "<event>/<file stem>", e.g. "0--Parade/0_Parade_marchingband_1_20", as in the
official file lists and prediction folders; `image_id` gives the id of an image path laid out as
WIDER FACE's `images/<event>/<name>.jpg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adyolo.eval.widerface.protocol import SETTINGS, ImageGroundTruth

# Official ground-truth file names inside eval_tools/ground_truth/.
FACE_MAT = "wider_face_val.mat"
SETTING_MATS = {setting: f"wider_{setting}_val.mat" for setting in SETTINGS}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_id(path: str | Path) -> str:
    """`.../<event>/<name>.jpg` -> "<event>/<name>", the official image id."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}"


def load_widerface_mat(gt_dir: str | Path) -> dict[str, ImageGroundTruth]:
    """Official validation ground truth -> image id ("<event>/<file name>") -> ImageGroundTruth with
    keep masks for easy / medium / hard.

    gt_dir holds wider_face_val.mat (event_list [E, 1], file_list [E, 1] of [F, 1], face_bbx_list
    [E, 1] of [F, 1] of [N, 4] x y w h) and wider_{easy,medium,hard}_val.mat (gt_list [E, 1] of
    [F, 1] of [K, 1] 1-based indices of the faces that count in that setting).
    """
    gt_dir = Path(gt_dir)
    faces = _load_mat(gt_dir / FACE_MAT)
    events = _cells(faces["event_list"])
    file_lists = _cells(faces["file_list"])
    box_lists = _cells(faces["face_bbx_list"])
    keep_lists = {setting: _cells(_load_mat(gt_dir / name)["gt_list"]) for setting, name in SETTING_MATS.items()}
    for what, cells in [("file_list", file_lists), ("face_bbx_list", box_lists)] + [
        (f"gt_list of {SETTING_MATS[setting]}", cells) for setting, cells in keep_lists.items()
    ]:
        if len(cells) != len(events):
            raise ValueError(f"{gt_dir}: {what} has {len(cells)} events, event_list has {len(events)}")

    ground_truth = {}
    for event_index, event_cell in enumerate(events):
        event = _cell_string(event_cell)
        files = _cells(file_lists[event_index])
        boxes_per_file = _cells(box_lists[event_index])
        keep_per_file = {setting: _cells(cells[event_index]) for setting, cells in keep_lists.items()}
        for file_index, file_cell in enumerate(files):
            key = f"{event}/{_strip_image_extension(_cell_string(file_cell))}"
            boxes = np.asarray(boxes_per_file[file_index], dtype=np.float64).reshape(-1, 4)
            keep = {
                setting: _keep_mask(key, setting, cells[file_index], len(boxes))
                for setting, cells in keep_per_file.items()
            }
            ground_truth[key] = ImageGroundTruth(boxes=boxes, keep=keep)
    return ground_truth


def _load_mat(path: Path) -> dict:
    """scipy.io.loadmat with default (unsqueezed) layout; a missing file says where to get it."""
    from scipy.io import loadmat  # only needed for the official ground truth

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the official WIDER FACE ground truth ({FACE_MAT}, "
            f"{', '.join(SETTING_MATS.values())}) comes with the WIDER FACE eval_tools archive, "
            "folder ground_truth/"
        )
    return loadmat(str(path))


def _cells(cell_array) -> list:
    """A MATLAB cell array as loaded by loadmat (object array [K, 1] or [1, K]) -> its K elements."""
    return list(np.asarray(cell_array, dtype=object).reshape(-1))


def _cell_string(cell) -> str:
    """A MATLAB char array as loaded by loadmat (e.g. array(['0--Parade'])) -> the string."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            raise ValueError(f"expected a single string in a .mat cell, got an array of shape {cell.shape}")
        cell = cell.reshape(-1)[0]
    return str(cell)


def _strip_image_extension(name: str) -> str:
    """The official file_list has names without extension; drop one anyway if present."""
    for extension in IMAGE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def _keep_mask(key: str, setting: str, indices, num_faces: int) -> np.ndarray:
    """1-based face indices [K, 1] -> [num_faces] bool mask."""
    indices = np.asarray(indices).reshape(-1).astype(np.int64)
    if len(indices) and (indices.min() < 1 or indices.max() > num_faces):
        raise ValueError(f"{key}: {setting} face index out of range 1..{num_faces}: {indices.min()}..{indices.max()}")
    mask = np.zeros(num_faces, dtype=bool)
    mask[indices - 1] = True
    return mask
