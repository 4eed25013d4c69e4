"""Frames from image and video files, and back: what the vision data and the VQGAN read and write.

Frames are uint8 arrays [F, H, W, 3] (RGB). Images (PNG, JPEG, WebP, BMP) are one frame, read with
Pillow; GIFs and videos (MP4, WebM, MOV, MKV, AVI) are read through imageio, videos with its PyAV
plugin (the `av` package). An alpha channel is dropped and grey frames become RGB.
"""

import pathlib

import numpy as np

from model_zoo.documents import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GIF_SUFFIXES = (".gif",)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
SUFFIXES = IMAGE_SUFFIXES + GIF_SUFFIXES + VIDEO_SUFFIXES


class MediaError(DataError):
    """An image or video that cannot be used, named by its path."""


def sampled_indices(count: int, max_frames: int | None) -> np.ndarray:
    """The frames kept of `count`: all of them when `max_frames` is None or not below `count`,
    else `max_frames` spread evenly from the first to the last (LWM's np.linspace, rounded down)."""
    if max_frames is None or count <= max_frames:
        return np.arange(count)
    return np.linspace(0, count - 1, max_frames).astype(int)


def read_frames(path, *, max_frames: int | None = None) -> np.ndarray:
    """uint8 [F, H, W, 3] RGB frames of an image (F = 1), a GIF or a video; with `max_frames`, at
    most that many, sampled evenly over the whole clip (`sampled_indices`). A video is decoded
    twice when `max_frames` is given (once to count its frames, once to keep the sampled ones), so
    that a long clip is never held whole in memory.

    MediaError (a DataError, a ValueError) naming the path: an unknown extension, a missing or
    unreadable file, a clip with no frame."""
    path = pathlib.Path(path)
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MediaError(f"{path}: unknown kind of image or video {suffix or '(no extension)'!r}; "
                         f"expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        if suffix in IMAGE_SUFFIXES:
            frames = _read_image(path)
        else:
            frames = _read_clip(path, max_frames, plugin="pyav" if suffix in VIDEO_SUFFIXES else None)
    except MediaError:
        raise
    except Exception as error:  # Pillow, imageio and PyAV each raise their own kinds
        if suffix in VIDEO_SUFFIXES and _no_video_stream(path):
            raise MediaError(f"{path}: holds no frame (the file has no video stream)") from None
        raise MediaError(f"{path}: cannot read it as {'an image' if suffix in IMAGE_SUFFIXES else 'a clip'} "
                         f"({type(error).__name__}: {error})") from None
    if not len(frames):
        raise MediaError(f"{path}: holds no frame")
    return frames


def _read_image(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8)[None]


def _read_clip(path, max_frames, plugin) -> np.ndarray:
    import imageio.v3 as iio

    options = {"plugin": plugin} if plugin else {}
    keep = None
    if max_frames is not None:
        keep = set(sampled_indices(sum(1 for _ in iio.imiter(path, **options)), max_frames).tolist())
    frames = [_rgb(f) for i, f in enumerate(iio.imiter(path, **options)) if keep is None or i in keep]
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def _no_video_stream(path) -> bool:
    """Whether `path` opens as a media container that holds no video (a clip of zero frames)."""
    try:
        import av

        with av.open(str(path)) as container:
            return not container.streams.video
    except Exception:  # not a container at all: unreadable, not empty
        return False


def _rgb(frame) -> np.ndarray:
    """An imageio frame as uint8 [H, W, 3]: grey repeated, alpha dropped."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        if frame.dtype == np.uint16:
            frame = (frame >> 8).astype(np.uint8)
        else:
            raise ValueError(f"frames of dtype {frame.dtype} are not supported (expected uint8)")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"a frame of shape {frame.shape} is not an image")
    if frame.shape[-1] in (1, 2):  # grey, grey + alpha
        frame = np.repeat(frame[..., :1], 3, axis=-1)
    return np.ascontiguousarray(frame[..., :3])


def fit_frames(frames, size: int) -> np.ndarray:
    """uint8 [F, size, size, 3]: each frame centre-cropped to a square (its shorter side), then
    resized to size x size with Pillow's bicubic filter (antialiased when shrinking). Frames of any
    other size are resized; frames already size x size are returned as they are."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    height, width = frames.shape[1:3]
    if height == width == size:
        return frames
    from PIL import Image

    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    fitted = [Image.fromarray(f[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BICUBIC)
              for f in frames]
    return np.stack([np.asarray(f, np.uint8) for f in fitted])


def write_frames(path, frames, fps: float = 4) -> list[pathlib.Path]:
    """Writes uint8 frames [F, H, W, 3] (or one frame [H, W, 3]) and returns the files written.

    `.gif`: an animation at `fps` that loops forever. `.mp4`: H.264 at `fps` (even height and
    width). `.png` / `.jpg`: one frame is written to `path`; several frames go to one file each
    beside it, `{stem}-000.png`, `{stem}-001.png`, ..., and `path` itself is not written."""
    path = pathlib.Path(path)
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"frames must be uint8 [F, H, W, 3] with F >= 1, got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    suffix = path.suffix.lower()
    import imageio.v3 as iio

    if suffix == ".gif":
        iio.imwrite(path, frames, loop=0, duration=1000 / fps)
        return [path]
    if suffix == ".mp4":
        iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps)
        return [path]
    if suffix in (".png", ".jpg", ".jpeg"):
        if len(frames) == 1:
            iio.imwrite(path, frames[0])
            return [path]
        paths = [path.with_name(f"{path.stem}-{i:03d}{path.suffix}") for i in range(len(frames))]
        for frame, frame_path in zip(frames, paths):
            iio.imwrite(frame_path, frame)
        return paths
    raise ValueError(f"{path}: cannot write frames as {suffix or '(no extension)'!r}; use .gif, .mp4, .png or .jpg")
