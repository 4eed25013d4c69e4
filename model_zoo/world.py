"""A procedural video world: one coloured shape moving across a black 64x64 frame for 8 frames.

Clips come with a caption and three one-word questions, and the scorers read colour, motion and shape
back from pixels, so that clips a model generates can be scored against what was asked for.
"""

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
# (dx, dy) per frame in image coordinates: y grows downward, so "up" is negative y.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FRAMES = 8
SIZE = 64
STEP = 3
SIZES = range(12, 21)  # 16 pixels across, +-4
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "direction": "Which way is it moving?",
}

# A pixel belongs to the shape when its brightest channel reaches this: every named colour has a
# channel at 255, and the threshold sits far above Gaussian noise of sigma ~20 on black.
BRIGHT = 96
# Bounding-box fill ratios of the continuous shapes; shape_of picks the nearest.
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class Clip:
    """One clip: what is drawn, its size in pixels across, and its centre (x0, y0) at frame 0."""

    colour: str
    shape: str
    direction: str
    size: int
    x0: float
    y0: float

    def __post_init__(self):
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("direction", self.direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        half = self.size / 2
        for x, y in self.centres():
            if not (half <= x <= SIZE - half and half <= y <= SIZE - half):
                raise ValueError(f"{self} leaves the {SIZE}x{SIZE} frame: centre ({x}, {y}) in some frame")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    def answer(self, kind: str) -> str:
        """The one-word answer to QUESTIONS[kind]."""
        if kind not in QUESTIONS:
            raise ValueError(f"unknown question kind {kind!r}; expected one of {list(QUESTIONS)}")
        return getattr(self, kind)

    def centres(self) -> list[tuple[float, float]]:
        """The centre (x, y) in each frame."""
        dx, dy = DIRECTIONS[self.direction]
        return [(self.x0 + STEP * t * dx, self.y0 + STEP * t * dy) for t in range(FRAMES)]


def random_clip(rng: np.random.Generator) -> Clip:
    """A uniformly drawn clip whose shape stays fully inside the frame in all frames."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    size = int(rng.integers(SIZES.start, SIZES.stop))
    travel = STEP * (FRAMES - 1)

    def start(d):
        # An integer corner keeps the bounding box on pixel edges, so the shape is exactly `size` wide;
        # the room for the whole path is left on the side the shape moves towards.
        low, high = (travel if d < 0 else 0), SIZE - size - (travel if d > 0 else 0)
        return int(rng.integers(low, high + 1))

    dx, dy = DIRECTIONS[direction]
    left, top = start(dx), start(dy)
    return Clip(colour, shape, direction, size, left + size / 2, top + size / 2)


def _mask(shape: str, size: float, cx: float, cy: float) -> np.ndarray:
    """[SIZE, SIZE] bool: the pixels whose centres (i + 0.5) lie inside the shape."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    half = size / 2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    # Apex at the top centre, base along the bottom edge: the half-width grows by 1/2 per pixel down.
    depth = y - (cy - half)
    return (depth >= 0) & (depth <= size) & (np.abs(x - cx) <= depth / 2)


def render(clip: Clip) -> np.ndarray:
    """The clip's frames, uint8 [FRAMES, SIZE, SIZE, 3]."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    for t, (cx, cy) in enumerate(clip.centres()):
        frames[t][_mask(clip.shape, clip.size, cx, cy)] = COLOURS[clip.colour]
    return frames


def _as_frames(frames, ndims: tuple[int, ...], layout: str) -> np.ndarray:
    """float64 pixels after checking the layout and the 0..255 range."""
    array = np.asarray(frames)
    if array.ndim not in ndims or array.shape[-1] != 3 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"expected {layout} uint8-like pixels, got shape {array.shape} dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.size == 0 or not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
        raise ValueError(f"expected {layout} pixels in 0..255, got an empty, non-finite or out-of-range array")
    return array


def _bright(pixels: np.ndarray, what: str) -> np.ndarray:
    """bool mask of the shape's pixels (brightest channel >= BRIGHT); raises if there are none."""
    mask = pixels.max(axis=-1) >= BRIGHT
    if not mask.any():
        raise ValueError(f"no pixel brighter than {BRIGHT} in {what}; is the clip blank?")
    return mask


def dominant_colour(frames) -> str:
    """The named colour nearest the mean of the bright pixels of frames [F, H, W, 3] or [H, W, 3]."""
    pixels = _as_frames(frames, (3, 4), "[F, H, W, 3] or [H, W, 3]")
    mean = pixels[_bright(pixels, "frames")].mean(axis=0)
    names = list(COLOURS)
    distances = np.linalg.norm(np.array([COLOURS[n] for n in names]) - mean, axis=1)
    return names[int(np.argmin(distances))]


def motion(frames) -> str:
    """The direction the centroid of bright pixels moves, from the first to the last frame that shows it."""
    pixels = _as_frames(frames, (4,), "[F, H, W, 3]")
    mask = _bright(pixels, "frames")
    # Frames where the shape vanished (in generated clips) are skipped rather than failing the clip.
    shown = [t for t in range(len(mask)) if mask[t].any()]
    if len(shown) < 2:
        raise ValueError(f"the shape shows in {len(shown)} of {len(mask)} frames; motion needs two")

    def centroid(t):
        ys, xs = np.nonzero(mask[t])
        return xs.mean(), ys.mean()

    (xa, ya), (xb, yb) = centroid(shown[0]), centroid(shown[-1])
    dx, dy = xb - xa, yb - ya
    if max(abs(dx), abs(dy)) < 0.5:
        raise ValueError(f"the shape does not move: its centroid shifts ({dx:.2f}, {dy:.2f}) px")
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def shape_of(frame) -> str:
    """The shape whose bounding-box fill ratio is nearest that of the bright pixels of one frame [H, W, 3]."""
    pixels = _as_frames(frame, (3,), "one frame [H, W, 3]")
    mask = _bright(pixels, "the frame")
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    ratio = mask.sum() / box
    return min(FILL, key=lambda name: abs(FILL[name] - ratio))
