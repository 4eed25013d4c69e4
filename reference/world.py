"""The procedural world's rules drawn by PIL, independently of `model_zoo.world`: clips to test the
world's scorers and to score a model on clips its own renderer did not make."""

import numpy as np
from PIL import Image, ImageDraw

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
       "white": (255, 255, 255)}
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAVEL = 3 * 7  # 3 px a frame over 8 frames


def draw_truth(rng) -> tuple:
    """Random clip parameters drawn from the rules: names, size 12..20, and a top-left corner keeping
    the whole path of the bounding box inside [0, 64)."""
    colour = str(rng.choice(list(RGB)))
    shape = str(rng.choice(["circle", "square", "triangle"]))
    direction = str(rng.choice(list(MOVES)))
    size = int(rng.integers(12, 21))
    dx, dy = MOVES[direction]
    corner = [int(rng.integers(TRAVEL if d < 0 else 0, 64 - size - (TRAVEL if d > 0 else 0) + 1)) for d in (dx, dy)]
    return colour, shape, direction, size, *corner


def pil_clip(colour, shape, direction, size, left, top):
    """The clip drawn with PIL: pixel (i, j) covers [i, i+1) x [j, j+1), PIL's coordinates name pixels."""
    dx, dy = MOVES[direction]
    frames = []
    for t in range(8):
        image = Image.new("RGB", (64, 64))
        draw = ImageDraw.Draw(image)
        x, y = left + 3 * t * dx, top + 3 * t * dy
        box = (x, y, x + size - 1, y + size - 1)
        if shape == "circle":
            draw.ellipse(box, fill=RGB[colour])
        elif shape == "square":
            draw.rectangle(box, fill=RGB[colour])
        else:
            draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=RGB[colour])
        frames.append(np.asarray(image))
    return np.stack(frames)
