"""The hard synthetic preset (`data.synthetic.preset: hard`): small faces where they are hard to find.

Modelled on what makes WIDER FACE's hard split hard (its paper's attribute statistics): most faces are
crowds of people seen from afar, so faces of 3-16 px dominate the count, and they come blurred,
occluded, badly lit, compressed and at odd poses. Each image is built as a scene, back to front:

* a cluttered background with face-like confusers (skin-coloured blobs without features);
* in most images a crowd in perspective: rows of people (a torso and a head) whose faces grow from
  3-5 px at the back to 10-28 px at the front, each row partly hiding the one behind it, tens to a few
  hundred faces per image;
* scattered faces of 3-96 px (log-uniform), many in profile (up to 90 degrees of yaw, the far eye and
  mouth corner hidden) or rolled, some motion-blurred on their own;
* objects in front of some faces (hands, signs, bars);
* then the camera: a shadow across the scene, low light or haze, defocus or camera-shake blur, sensor
  noise and a JPEG quality of 12-70.

Every face is labelled with its box (the whole face, also where it is hidden) and the landmarks that
are visible (a landmark turned away or covered is missing, -1); a face hidden to less than 15 % is not
labelled. The attribute file beside each label file (`adyolo.data.attributes`) says per face how
blurred, occluded, lit and posed it is and whether it belongs to a crowd, from the quantities the
renderer applied: blur from the blur's extent relative to the face's width, occlusion from the share
of the face's pixels left visible, illumination from the light and contrast at the face, pose from its
yaw and roll. Image `i` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from adyolo.data.canvas import SKIN_TONES_BGR, background, overlap, rotated_half_extent
from adyolo.data.faces import Faces

# Bump when the renderer changes, so cached datasets are regenerated.
HARD_GENERATOR_VERSION = 1
# A third word in the image's random stream keeps it apart from the default preset's images.
HARD_STREAM = 7

OCCLUDER = np.iinfo(np.uint16).max  # owner-map value of anything drawn in front of a face that is not one
MIN_VISIBLE = 0.15  # a face with less of its pixels visible is not labelled
MIN_LABEL_PX = 3.0  # nor one whose box, clipped to the image, is narrower or shorter than this
CROWD_PROBABILITY = 0.8
FIXED_POINT = 4  # cv2 drawing: 4 fractional bits
# The face's own frame, in fractions of width and height from its centre: left eye, right eye, nose,
# left and right mouth corner (as seen in the image).
LANDMARKS_LOCAL = np.array([[-0.2, -0.1], [0.2, -0.1], [0.0, 0.1], [-0.17, 0.27], [0.17, 0.27]])
LEFT_SIDE, RIGHT_SIDE = (0, 3), (1, 4)  # hidden when the face turns far enough the other way
PROFILE_YAW = 0.6  # |yaw| (-1..1, 1 = 90 degrees) past which the far eye and mouth corner are hidden


@dataclass
class _Face:
    """One drawn face, before the camera and the visibility check."""

    box: np.ndarray  # [4] x1, y1, x2, y2 pixels (the whole face)
    points: np.ndarray  # [5, 2] pixels
    turned_away: np.ndarray  # [5] bool: landmarks hidden by the face's own pose
    width: float  # face width in pixels
    yaw: float
    roll: float  # degrees
    crowd: bool
    own_pixels: int  # pixels of the face in the owner map when drawn
    local_blur: float = 0.0  # extent in pixels of a blur applied to this face alone


@dataclass
class _Camera:
    """What the camera did to the whole image."""

    light: np.ndarray  # [H, W] multiplicative light (1 = as drawn)
    contrast: float = 1.0  # 1 = as drawn; lower blends toward a grey
    blur_px: float = 0.0  # extent of the defocus / shake blur in pixels
    noise: float = 0.0
    jpeg_quality: int = 90
    ops: list = field(default_factory=list)


def render_hard_image(image_size: int, seed: int, split: str, index: int) -> tuple[np.ndarray, Faces, np.ndarray, int]:
    """Image `index` of `split` -> (BGR uint8 [H, W, 3], its faces in pixels, attributes [N, 5] int64 in
    `adyolo.data.attributes.ATTRIBUTES` order, the JPEG quality to write it with)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index, HARD_STREAM])
    width = image_size
    height = int(round(image_size * rng.uniform(0.75, 1.0)))
    if rng.random() < 0.5:
        width, height = height, width
    image = background(rng, width, height)
    _confusers(image, rng)
    owner = np.zeros((height, width), np.uint16)
    faces: list[_Face] = []
    if rng.random() < CROWD_PROBABILITY:
        faces += _crowd(image, owner, rng, len(faces))
    faces += _scattered(image, owner, rng, len(faces))
    _occluders(image, owner, rng, faces)
    camera = _camera(image, rng)
    return _labels(image, owner, faces, camera)


# ---------------------------------------------------------------------------------------------------
# The scene


def _confusers(image: np.ndarray, rng: np.random.Generator) -> None:
    """Skin-coloured blobs without a face's features: balls, lamps, knees."""
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(3, 13))):
        colour = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] * rng.uniform(0.8, 1.15)
        axes = rng.uniform(1.5, 16, 2)
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        cv2.ellipse(
            image, _pt(centre), _axes(axes), rng.uniform(0, 180), 0, 360, _bgr(colour), -1, cv2.LINE_AA, FIXED_POINT
        )


def _crowd(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator, first_id: int) -> list[_Face]:
    """Rows of people in perspective, drawn back to front: faces grow from the back row to the front."""
    height, width = image.shape[:2]
    x0 = rng.uniform(-0.1, 0.3) * width
    x1 = x0 + rng.uniform(0.4, 1.1) * width
    top = rng.uniform(0.05, 0.4) * height
    bottom = rng.uniform(0.65, 1.05) * height
    back, front = rng.uniform(3.0, 5.0), math.exp(rng.uniform(math.log(10), math.log(28)))
    row_gap, spacing = rng.uniform(0.9, 1.5), rng.uniform(1.3, 3.2)
    faces: list[_Face] = []
    y = top
    while y < bottom:
        size = back + (front - back) * (y - top) / (bottom - top)
        xs = np.arange(x0 + rng.uniform(0, spacing * size), x1, spacing * size)
        xs = xs + rng.uniform(-0.3, 0.3, len(xs)) * size
        for x in xs[rng.permutation(len(xs))]:
            if rng.random() < 0.1:
                continue  # a gap in the row
            face_w = size * rng.uniform(0.85, 1.15)
            centre = np.array([x, y + rng.uniform(-0.2, 0.2) * size])
            _torso(image, owner, rng, centre, face_w)
            yaw = float(np.clip(rng.normal(0, 0.35), -1, 1))
            roll = float(rng.normal(0, 10))
            faces.append(_draw_face(image, owner, rng, first_id + len(faces) + 1, centre, face_w, yaw, roll, True))
        y += row_gap * size * 1.25
    return faces


def _torso(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator, centre: np.ndarray, face_w: float) -> None:
    """Shoulders below a face (in front of the row behind)."""
    colour = rng.uniform(10, 230, 3)
    body_centre = centre + [0, 1.35 * face_w]
    axes = np.array([1.15, 0.75]) * face_w
    cv2.ellipse(image, _pt(body_centre), _axes(axes), 0, 0, 360, _bgr(colour), -1, cv2.LINE_AA, FIXED_POINT)
    cv2.ellipse(owner, _pt(body_centre), _axes(axes), 0, 0, 360, int(OCCLUDER), -1, cv2.LINE_8, FIXED_POINT)


def _scattered(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator, first_id: int) -> list[_Face]:
    """Faces anywhere, of any size, many turned or rolled; some blurred on their own (they move)."""
    height, width = image.shape[:2]
    faces: list[_Face] = []
    boxes: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 13))):
        for _attempt in range(10):
            face_w = math.exp(rng.uniform(math.log(3), math.log(min(96, width / 3))))
            centre = rng.uniform([0, 0], [width, height])
            half = np.array([face_w, face_w * 1.25]) / 2
            box = np.concatenate([centre - half, centre + half])
            if all(overlap(box, other) < 0.3 for other in boxes):
                break
        else:
            continue
        boxes.append(box)
        yaw = float(rng.uniform(-1, 1))
        roll = float(rng.uniform(-90, 90) if rng.random() < 0.1 else rng.normal(0, 20))
        face = _draw_face(image, owner, rng, first_id + len(faces) + 1, centre, face_w, yaw, roll, False)
        if face_w >= 8 and rng.random() < 0.15:
            face.local_blur = _motion_blur_patch(image, rng, face.box, rng.uniform(0.15, 0.5) * face_w)
        faces.append(face)
    return faces


def _draw_face(
    image: np.ndarray,
    owner: np.ndarray,
    rng: np.random.Generator,
    face_id: int,
    centre: np.ndarray,
    face_w: float,
    yaw: float,
    roll: float,
    crowd: bool,
) -> _Face:
    """Hair, a skin ellipse and the visible features of a face turned by `yaw` (-1..1) and rolled by
    `roll` degrees; the face's pixels are marked `face_id` in `owner`, its hair as an occluder."""
    face_h = face_w * rng.uniform(1.15, 1.35)
    theta = math.radians(roll)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    # Turning narrows the spacing of the features and moves them toward the side the face turns to;
    # the nose sticks out furthest.
    local = LANDMARKS_LOCAL.copy()
    local[:, 0] = local[:, 0] * (1 - 0.45 * abs(yaw)) + 0.28 * yaw
    local[2, 0] = 0.38 * yaw
    local[:, 0] += rng.uniform(-0.03, 0.03)
    points = (local * [face_w, face_h]) @ rotation.T + centre
    turned_away = np.zeros(5, bool)
    if yaw > PROFILE_YAW:
        turned_away[list(RIGHT_SIDE)] = True
    elif yaw < -PROFILE_YAW:
        turned_away[list(LEFT_SIDE)] = True

    skin = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] * rng.uniform(0.8, 1.12)
    hair = rng.uniform(10, 90, 3)
    axes = np.array([face_w, face_h]) / 2
    hair_centre = centre - rotation @ [0.1 * yaw * face_w, 0.08 * face_h]
    hair_axes = _axes(axes * [1.08, 1.05])
    cv2.ellipse(image, _pt(hair_centre), hair_axes, roll, 180, 360, _bgr(hair), -1, cv2.LINE_AA, FIXED_POINT)
    cv2.ellipse(owner, _pt(hair_centre), hair_axes, roll, 180, 360, int(OCCLUDER), -1, cv2.LINE_8, FIXED_POINT)
    cv2.ellipse(image, _pt(centre), _axes(axes), roll, 0, 360, _bgr(skin), -1, cv2.LINE_AA, FIXED_POINT)
    cv2.ellipse(owner, _pt(centre), _axes(axes), roll, 0, 360, face_id, -1, cv2.LINE_8, FIXED_POINT)

    dark = _bgr(skin * 0.25)
    eye = max(1, int(face_w * 0.07 * 16))
    for i in (0, 1):
        if not turned_away[i]:
            cv2.circle(image, _pt(points[i]), int(eye * 1.6), (235, 235, 235), -1, cv2.LINE_AA, FIXED_POINT)
            cv2.circle(image, _pt(points[i]), eye, dark, -1, cv2.LINE_AA, FIXED_POINT)
    cv2.circle(image, _pt(points[2]), max(1, int(face_w * 0.05 * 16)), _bgr(skin * 0.7), -1, cv2.LINE_AA, 4)
    lips = (60.0, 60.0, float(rng.uniform(140, 200)))
    mid = (points[3] + points[4]) / 2 + rotation @ [0, 0.05 * face_h]
    mouth = [
        _pt(p) for p, hidden in ((points[3], turned_away[3]), (mid, False), (points[4], turned_away[4])) if not hidden
    ]
    thickness = max(1, int(round(face_w * 0.05)))
    cv2.polylines(image, [np.array(mouth)], False, lips, thickness, cv2.LINE_AA, FIXED_POINT)

    half = rotated_half_extent(face_w / 2, face_h / 2, roll)
    box = np.concatenate([centre - half, centre + half])
    x1, y1, x2, y2 = _window(box, owner.shape)
    own = int((owner[y1:y2, x1:x2] == face_id).sum())
    return _Face(box, points, turned_away, face_w, yaw, roll, crowd, own)


def _occluders(image: np.ndarray, owner: np.ndarray, rng: np.random.Generator, faces: list[_Face]) -> None:
    """Objects in front of some faces: a hand (skin), a sign (rectangle) or a bar (thick line)."""
    for face in faces:
        if rng.random() >= (0.08 if face.crowd else 0.2):
            continue
        centre = (face.box[:2] + face.box[2:]) / 2 + rng.uniform(-0.6, 0.6, 2) * face.width
        size = rng.uniform(0.3, 0.9) * face.width
        kind = rng.integers(3)
        if kind == 0:
            colour = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] * rng.uniform(0.8, 1.1)
            axes, angle = _axes([size / 2, size / 3]), rng.uniform(0, 180)
            cv2.ellipse(image, _pt(centre), axes, angle, 0, 360, _bgr(colour), -1, cv2.LINE_AA, FIXED_POINT)
            cv2.ellipse(owner, _pt(centre), axes, angle, 0, 360, int(OCCLUDER), -1, cv2.LINE_8, FIXED_POINT)
        elif kind == 1:
            corner_a, corner_b = _pt(centre - size / 2), _pt(centre + [size / 2, size])
            colour = _bgr(rng.uniform(0, 255, 3))
            cv2.rectangle(image, corner_a, corner_b, colour, -1, cv2.LINE_AA, FIXED_POINT)
            cv2.rectangle(owner, corner_a, corner_b, int(OCCLUDER), -1, cv2.LINE_8, FIXED_POINT)
        else:
            direction = rng.normal(size=2)
            direction = direction / (np.linalg.norm(direction) + 1e-9) * 2 * face.width
            ends = _pt(centre - direction), _pt(centre + direction)
            thickness = max(1, int(round(size / 3)))
            cv2.line(image, *ends, _bgr(rng.uniform(0, 255, 3)), thickness, cv2.LINE_AA, FIXED_POINT)
            cv2.line(owner, *ends, int(OCCLUDER), thickness, cv2.LINE_8, FIXED_POINT)


# ---------------------------------------------------------------------------------------------------
# The camera


def _camera(image: np.ndarray, rng: np.random.Generator) -> _Camera:
    """Light, contrast, blur, noise (in place on `image`) and the JPEG quality; returns what was done."""
    height, width = image.shape[:2]
    camera = _Camera(light=np.ones((height, width), np.float32))
    if rng.random() < 0.35:  # a shadow falling across the scene
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        camera.light *= rng.uniform(0.2, 0.6) + (1 - rng.uniform(0.2, 0.6)) * ramp
    if rng.random() < 0.3:  # low light
        camera.light *= rng.uniform(0.12, 0.4)
        camera.noise += rng.uniform(6, 14)
    if rng.random() < 0.2:  # haze: low contrast
        camera.contrast = float(rng.uniform(0.25, 0.55))
    pixels = image.astype(np.float32) * camera.light[..., None]
    if camera.contrast < 1:
        pixels = pixels * camera.contrast + float(rng.uniform(80, 170)) * (1 - camera.contrast)
    if rng.random() < 0.2:  # defocus
        sigma = rng.uniform(0.6, 1.8)
        pixels = cv2.GaussianBlur(pixels, (0, 0), sigma)
        camera.blur_px = math.hypot(camera.blur_px, 2 * sigma)
    if rng.random() < 0.2:  # camera shake
        length = rng.uniform(2, 6)
        pixels = cv2.filter2D(pixels, -1, _motion_kernel(length, rng.uniform(0, 180)))
        camera.blur_px = math.hypot(camera.blur_px, length)
    camera.noise += rng.uniform(2, 8)
    pixels = pixels + rng.normal(0, camera.noise, pixels.shape).astype(np.float32)
    image[...] = np.clip(pixels, 0, 255).astype(np.uint8)
    camera.jpeg_quality = int(rng.integers(12, 71))
    return camera


def _motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised line kernel `length` pixels long at `angle_deg`."""
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size, size), np.float32)
    c = (size - 1) / 2
    dx, dy = math.cos(math.radians(angle_deg)) * length / 2, math.sin(math.radians(angle_deg)) * length / 2
    cv2.line(kernel, _pt((c - dx, c - dy)), _pt((c + dx, c + dy)), 1.0, 1, cv2.LINE_AA, FIXED_POINT)
    return kernel / kernel.sum()


def _motion_blur_patch(image: np.ndarray, rng: np.random.Generator, box: np.ndarray, length: float) -> float:
    """Blur the window around `box` along a random direction; returns the blur's extent in pixels."""
    margin = int(math.ceil(length))
    x1, y1, x2, y2 = _window(box + [-margin, -margin, margin, margin], image.shape[:2])
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    patch = image[y1:y2, x1:x2]
    image[y1:y2, x1:x2] = cv2.filter2D(patch, -1, _motion_kernel(length, rng.uniform(0, 180)))
    return float(length)


# ---------------------------------------------------------------------------------------------------
# Labels and attributes


def _labels(
    image: np.ndarray, owner: np.ndarray, faces: list[_Face], camera: _Camera
) -> tuple[np.ndarray, Faces, np.ndarray, int]:
    height, width = image.shape[:2]
    boxes, points, attributes = [], [], []
    for face_id, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = _window(face.box, owner.shape)
        visible = int((owner[y1:y2, x1:x2] == face_id).sum()) / max(face.own_pixels, 1)
        box = np.clip(face.box, 0, [width, height, width, height])
        if visible < MIN_VISIBLE or min(box[2] - box[0], box[3] - box[1]) < MIN_LABEL_PX:
            continue
        pts = face.points.copy()
        for i, (px, py) in enumerate(pts):
            inside = 0 <= px < width and 0 <= py < height
            if face.turned_away[i] or not inside or owner[int(py), int(px)] != face_id:
                pts[i] = np.nan
        centre = np.clip(((face.box[:2] + face.box[2:]) / 2).astype(int), 0, [width - 1, height - 1])
        blur = math.hypot(camera.blur_px, face.local_blur) / face.width
        dim = camera.light[centre[1], centre[0]] < 0.35 or camera.contrast < 0.45
        boxes.append(box)
        points.append(pts)
        attributes.append(
            [
                0 if blur < 0.12 else 1 if blur < 0.35 else 2,
                0 if visible >= 0.85 else 1 if visible >= 0.5 else 2,
                int(dim),
                int(abs(face.yaw) > PROFILE_YAW or abs(face.roll) > 35),
                int(face.crowd),
            ]
        )
    labelled = Faces(
        np.zeros(len(boxes), np.int64),
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(points, np.float32).reshape(-1, 5, 2),
    )
    return image, labelled, np.array(attributes, np.int64).reshape(-1, 5), camera.jpeg_quality


# ---------------------------------------------------------------------------------------------------
# Geometry helpers


def _pt(p) -> tuple[int, int]:
    return int(round(p[0] * 16)), int(round(p[1] * 16))  # cv2 fixed point, FIXED_POINT fractional bits


def _axes(a) -> tuple[int, int]:
    return max(1, int(a[0] * 16)), max(1, int(a[1] * 16))


def _bgr(colour) -> tuple[float, float, float]:
    return tuple(float(c) for c in np.clip(colour, 0, 255))


def _window(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Integer pixel window of `box` [4] inside an image of `shape` (H, W, ...)."""
    height, width = shape[:2]
    x1, y1 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x2, y2 = min(width, int(math.ceil(box[2])) + 1), min(height, int(math.ceil(box[3])) + 1)
    return x1, y1, max(x1, x2), max(y1, y2)
