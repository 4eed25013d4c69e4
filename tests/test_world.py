"""The video world against an independent PIL renderer of its rules, and its scorers on clean and noisy clips."""

import collections

import numpy as np
import pytest

from model_zoo import world
from reference.world import MOVES, RGB, draw_truth, pil_clip


def fresh_seed():
    """A new seed each run; the assertion messages name it to replay a failure."""
    return np.random.SeedSequence().entropy


def truths(seed, n):
    rng = np.random.default_rng(seed)
    return [draw_truth(rng) for _ in range(n)]


def majority(values):
    return collections.Counter(values).most_common(1)[0][0]


def test_scorers_read_pil_renderings():
    seed = fresh_seed()
    truth = truths(seed, 200)
    shapes_right = 0
    for params in truth:
        colour, shape, direction = params[:3]
        frames = pil_clip(*params)
        assert world.dominant_colour(frames) == colour, (seed, params)
        assert world.motion(frames) == direction, (seed, params)
        shapes_right += majority([world.shape_of(f) for f in frames]) == shape
    assert shapes_right >= 0.95 * len(truth), f"seed {seed}: shape_of right on {shapes_right} of {len(truth)}"


def test_render_agrees_with_pil():
    seed = fresh_seed()
    for colour, shape, direction, size, left, top in truths(seed, 200):
        clip = world.Clip(colour, shape, direction, size, left + size / 2, top + size / 2)
        ours, theirs = world.render(clip), pil_clip(colour, shape, direction, size, left, top)
        assert ours.shape == (8, 64, 64, 3) and ours.dtype == np.uint8
        packed = np.unique(ours.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))
        r, g, b = RGB[colour]
        assert packed.tolist() == [0, (r << 16) + (g << 8) + b], (seed, clip, [hex(p) for p in packed])
        mask, pil_mask = ours.any(-1), theirs.any(-1)
        centroids = []
        for t in range(8):
            iou = (mask[t] & pil_mask[t]).sum() / (mask[t] | pil_mask[t]).sum()
            assert iou >= 0.8, f"seed {seed}, {clip} frame {t}: IoU {iou:.3f} with PIL"
            ys, xs = np.nonzero(mask[t])
            # fully inside, never cut by an edge: as wide as the shape and as many pixels as in frame 0
            assert xs.max() - xs.min() + 1 == size and ys.max() - ys.min() + 1 in (size - 1, size), (seed, clip, t)
            assert mask[t].sum() == mask[0].sum(), (seed, clip, t)
            centroids.append((xs.mean(), ys.mean()))
        steps = np.diff(np.array(centroids), axis=0)
        expected = np.broadcast_to(3 * np.array(MOVES[direction]), steps.shape)
        np.testing.assert_allclose(steps, expected, atol=0.5, err_msg=f"seed {seed}, {clip}")


def test_random_clip_covers_the_rules_and_is_deterministic():
    seed = fresh_seed()
    clips = [world.random_clip(np.random.default_rng([seed, i])) for i in range(500)]
    assert {c.colour for c in clips} == set(RGB)
    assert {c.shape for c in clips} == {"circle", "square", "triangle"}
    assert {c.direction for c in clips} == set(MOVES)
    assert {c.size for c in clips} == set(range(12, 21))
    for clip in clips[:100]:
        half = clip.size / 2
        for x, y in clip.centres():
            assert half <= x <= 64 - half and half <= y <= 64 - half, clip
        assert clip.caption == f"a {clip.colour} {clip.shape} moving {clip.direction}"
        assert [clip.answer(k) for k in ("colour", "shape", "direction")] == [clip.colour, clip.shape, clip.direction]
    again = [world.random_clip(np.random.default_rng([seed, i])) for i in range(500)]
    assert again == clips
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    np.testing.assert_array_equal(world.render(world.random_clip(rng_a)), world.render(world.random_clip(rng_b)))


def test_questions_and_clip_checks():
    assert world.QUESTIONS == {"colour": "What colour is the shape?", "shape": "What shape is it?",
                               "direction": "Which way is it moving?"}
    with pytest.raises(ValueError, match="unknown question kind 'size'"):
        world.Clip("red", "square", "left", 16, 40, 32).answer("size")
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        world.Clip("purple", "square", "left", 16, 40, 32)
    with pytest.raises(ValueError, match="leaves the 64x64 frame"):
        world.Clip("red", "square", "left", 16, 20, 32)  # 21 px to the left of x=20 is outside


def test_scorers_refuse_blank_and_misshapen_input():
    blank = np.zeros((8, 64, 64, 3), np.uint8)
    for scorer, arg in ((world.dominant_colour, blank), (world.motion, blank), (world.shape_of, blank[0])):
        with pytest.raises(ValueError, match="no pixel brighter than .* is the clip blank"):
            scorer(arg)
    frames = pil_clip("red", "square", "right", 16, 4, 20)
    with pytest.raises(ValueError, match=r"expected \[F, H, W, 3\].*shape \(64, 64, 3\)"):
        world.motion(frames[0])
    with pytest.raises(ValueError, match=r"expected one frame \[H, W, 3\].*shape \(8, 64, 64, 3\)"):
        world.shape_of(frames)
    with pytest.raises(ValueError, match=r"shape \(8, 64, 64\)"):
        world.dominant_colour(frames[..., 0])
    with pytest.raises(ValueError, match="in 0..255"):
        world.dominant_colour(frames.astype(np.int16) * 4)
    with pytest.raises(ValueError, match="does not move"):
        world.motion(np.repeat(frames[:1], 8, axis=0))
    with pytest.raises(ValueError, match="shows in 1 of 8 frames"):
        world.motion(np.concatenate([frames[:1], blank[1:]]))


def test_scorers_survive_noise():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    truth = [draw_truth(rng) for _ in range(200)]
    colour_right = direction_right = 0
    for colour, shape, direction, size, left, top in truth:
        frames = pil_clip(colour, shape, direction, size, left, top).astype(np.float64)
        noisy = np.clip(frames + rng.normal(0, 20, frames.shape), 0, 255).astype(np.uint8)
        colour_right += world.dominant_colour(noisy) == colour
        direction_right += world.motion(noisy) == direction
    assert colour_right >= 0.95 * len(truth), f"seed {seed}: colour right on {colour_right} of {len(truth)}"
    assert direction_right >= 0.95 * len(truth), f"seed {seed}: direction right on {direction_right} of {len(truth)}"
