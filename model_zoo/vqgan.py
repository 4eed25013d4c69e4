"""LWM's VQGAN in JAX: frames -> codes (`encode`) and codes -> frames (`decode`).

The architecture is MaskGIT's as LWM uses it (`lwm/vqgan.py`): a convolutional encoder of residual
blocks that halves the resolution at every level but the last, no attention, a 1x1 convolution into
the codebook's space, nearest-code quantisation, and the mirror-image decoder. Its defaults are
LWM's: 256x256 frames, 128 channels times (1, 2, 2, 4, 6), 2 residual blocks a level, z 64, 8192
codes of dimension 64, so a frame becomes 16 x 16 = 256 codes.

diffusers' `VQModel` in aMUSEd's configuration is the same network, so the parameters are kept
under diffusers' state-dict names (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...), with the
convolutions in JAX's HWIO layout: a diffusers folder loads as it is, and a model trained here saves
as one (`load_diffusers` / `save_diffusers`). Where the two differ, this follows LWM: decoded pixels
are clipped to [-1, 1], and a configuration with mid-block attention is refused.
"""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 256
    channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    num_res_blocks: int = 2
    z_channels: int = 64
    num_codes: int = 8192
    code_dim: int = 64
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        for name in ("resolution", "channels", "hidden_channels", "num_res_blocks", "z_channels", "num_codes",
                     "code_dim", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VQGANConfig.{name} must be a positive int, got {value!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m <= 0 for m in self.channel_mult):
            raise ValueError(f"VQGANConfig.channel_mult must be positive ints, got {self.channel_mult!r}")
        if self.resolution % self.downsampling:
            raise ValueError(f"VQGANConfig.resolution={self.resolution} must be a multiple of {self.downsampling} "
                             f"(2 ** {len(self.channel_mult) - 1} for {len(self.channel_mult)} levels)")
        for width in self.widths:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not a multiple of norm_groups={self.norm_groups}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.hidden_channels * m for m in self.channel_mult)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        """Codes along each side of a frame."""
        return self.resolution // self.downsampling

    @property
    def tokens_per_frame(self) -> int:
        return self.grid**2

    def to_diffusers(self) -> dict:
        """diffusers' `VQModel` config for the same network."""
        levels = len(self.channel_mult)
        return {
            "_class_name": "VQModel", "in_channels": self.channels, "out_channels": self.channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.widths), "layers_per_block": self.num_res_blocks, "act_fn": "silu",
            "latent_channels": self.z_channels, "sample_size": self.resolution, "num_vq_embeddings": self.num_codes,
            "norm_num_groups": self.norm_groups, "vq_embed_dim": self.code_dim, "norm_type": "group",
            "mid_block_add_attention": False, "lookup_from_codebook": True, "force_upcast": False,
        }

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> "VQGANConfig":
        """The config of a diffusers `VQModel` folder; what this network cannot be is refused, by name."""
        expected = {"_class_name": "VQModel", "act_fn": "silu", "norm_type": "group", "mid_block_add_attention": False}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise ValueError(f"{where}: {key} is {config[key]!r}; LWM's VQGAN needs {value!r}")
        blocks = [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]
        for key, kind in blocks:
            if any(b != kind for b in config.get(key, [])):
                raise ValueError(f"{where}: {key} are {config[key]}; LWM's VQGAN has only {kind}")
        widths = config["block_out_channels"]
        if any(w % widths[0] for w in widths):
            raise ValueError(f"{where}: block_out_channels {widths} are not multiples of the first")
        return cls(
            resolution=int(config.get("sample_size", 256)), channels=config.get("in_channels", 3),
            hidden_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=config["layers_per_block"], z_channels=config["latent_channels"],
            num_codes=config["num_vq_embeddings"], code_dim=config.get("vq_embed_dim") or config["latent_channels"],
            norm_groups=config.get("norm_num_groups", 32),
        )


LWM_VQGAN = VQGANConfig()


# --- parameters -----------------------------------------------------------------------------------------


def _shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's diffusers name and its JAX shape (convolutions HWIO)."""
    shapes = {}

    def conv(name, size, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (size, size, cin, cout), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", 3, cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", 3, cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", 1, cin, cout)

    widths, blocks, last = config.widths, config.num_res_blocks, len(config.widths) - 1
    conv("encoder.conv_in", 3, config.channels, widths[0])
    cin = widths[0]
    for level, width in enumerate(widths):
        for i in range(blocks):
            resnet(f"encoder.down_blocks.{level}.resnets.{i}", cin, width)
            cin = width
        if level != last:
            conv(f"encoder.down_blocks.{level}.downsamplers.0.conv", 3, width, width)
    for i in range(2):
        resnet(f"encoder.mid_block.resnets.{i}", widths[-1], widths[-1])
    norm("encoder.conv_norm_out", widths[-1])
    conv("encoder.conv_out", 3, widths[-1], config.z_channels)
    conv("quant_conv", 1, config.z_channels, config.code_dim)
    shapes["quantize.embedding.weight"] = (config.num_codes, config.code_dim)
    conv("post_quant_conv", 1, config.code_dim, config.z_channels)
    conv("decoder.conv_in", 3, config.z_channels, widths[-1])
    for i in range(2):
        resnet(f"decoder.mid_block.resnets.{i}", widths[-1], widths[-1])
    cin = widths[-1]
    for up, width in enumerate(reversed(widths)):  # diffusers numbers the decoder's levels from the deepest
        for i in range(blocks + 1):
            resnet(f"decoder.up_blocks.{up}.resnets.{i}", cin, width)
            cin = width
        if up != last:
            conv(f"decoder.up_blocks.{up}.upsamplers.0.conv", 3, width, width)
    norm("decoder.conv_norm_out", widths[0])
    conv("decoder.conv_out", 3, widths[0], config.channels)
    return shapes


def init_params(config: VQGANConfig, key) -> dict[str, jax.Array]:
    """PyTorch's default initialisation (uniform in +-1/sqrt(fan_in)); the codebook uniform in +-1/num_codes."""
    params, shapes = {}, _shapes(config)
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        k = jax.random.fold_in(key, i)
        if name == "quantize.embedding.weight":
            params[name] = jax.random.uniform(k, shape, jnp.float32, -1 / config.num_codes, 1 / config.num_codes)
        elif ".norm" in name or "norm_out" in name:
            params[name] = jnp.ones(shape) if name.endswith("weight") else jnp.zeros(shape)
        else:
            conv = name.rsplit(".", 1)[0] + ".weight"
            fan_in = int(np.prod(shapes[conv][:3]))
            params[name] = jax.random.uniform(k, shape, jnp.float32, -(fan_in**-0.5), fan_in**-0.5)
    return params


def load_diffusers(folder) -> tuple[VQGANConfig, dict[str, jax.Array]]:
    """(config, params) of a diffusers `VQModel` folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    for name in ("config.json", WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers VQModel folder: it has no {name}")
    config = VQGANConfig.from_diffusers(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    tensors = load_file(folder / WEIGHTS)
    shapes = _shapes(config)
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"{folder / WEIGHTS} does not hold this VQGAN's parameters: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    params = {}
    for name, shape in shapes.items():
        value = tensors[name].astype(np.float32)
        if len(shape) == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != shape:
            raise ValueError(f"{folder / WEIGHTS}: {name} has shape {value.shape}, the config needs {shape}")
        params[name] = jnp.asarray(value)
    return config, params


def save_diffusers(folder, config: VQGANConfig, params):
    """Writes `params` as a diffusers `VQModel` folder, which diffusers loads as it is."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in params.items():
        value = np.asarray(value, np.float32)
        tensors[name] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value)
    save_file(tensors, folder / WEIGHTS)
    (folder / "config.json").write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")


# --- the network ----------------------------------------------------------------------------------------


def _conv(params, name, x, stride=1, padding="SAME"):
    y = jax.lax.conv_general_dilated(
        x, params[f"{name}.weight"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + params[f"{name}.bias"]


def _group_norm(params, name, x, groups, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + eps)
    return g.reshape(n, h, w, c) * params[f"{name}.weight"] + params[f"{name}.bias"]


def _resnet(params, name, x, groups):
    h = _conv(params, f"{name}.conv1", jax.nn.silu(_group_norm(params, f"{name}.norm1", x, groups)))
    h = _conv(params, f"{name}.conv2", jax.nn.silu(_group_norm(params, f"{name}.norm2", h, groups)))
    if f"{name}.conv_shortcut.weight" in params:
        x = _conv(params, f"{name}.conv_shortcut", x)
    return x + h


def _downsample(params, name, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # asymmetric, as both LWM and diffusers pad
    return _conv(params, name, x, stride=2, padding="VALID")


def _upsample(params, name, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour
    return _conv(params, name, x)


def encode_latents(params, frames, config: VQGANConfig):
    """frames float [N, R, R, C] in [-1, 1] -> the codebook-space latents [N, g, g, code_dim]."""
    groups, last = config.norm_groups, len(config.widths) - 1
    x = _conv(params, "encoder.conv_in", frames)
    for level in range(len(config.widths)):
        for i in range(config.num_res_blocks):
            x = _resnet(params, f"encoder.down_blocks.{level}.resnets.{i}", x, groups)
        if level != last:
            x = _downsample(params, f"encoder.down_blocks.{level}.downsamplers.0.conv", x)
    for i in range(2):
        x = _resnet(params, f"encoder.mid_block.resnets.{i}", x, groups)
    x = jax.nn.silu(_group_norm(params, "encoder.conv_norm_out", x, groups))
    x = _conv(params, "encoder.conv_out", x)
    return _conv(params, "quant_conv", x)


def nearest_codes(params, latents):
    """The index of each latent's nearest codebook entry (squared distance)."""
    codebook = params["quantize.embedding.weight"]
    distance = (
        jnp.sum(latents**2, axis=-1, keepdims=True) + jnp.sum(codebook**2, axis=-1)
        - 2 * jnp.einsum("...d,nd->...n", latents, codebook, precision=jax.lax.Precision.HIGHEST)
    )
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)


def decode_latents(params, quantized, config: VQGANConfig):
    """Quantized latents [N, g, g, code_dim] -> frames float [N, R, R, C], unclipped."""
    groups, last = config.norm_groups, len(config.widths) - 1
    x = _conv(params, "post_quant_conv", quantized)
    x = _conv(params, "decoder.conv_in", x)
    for i in range(2):
        x = _resnet(params, f"decoder.mid_block.resnets.{i}", x, groups)
    for up in range(len(config.widths)):
        for i in range(config.num_res_blocks + 1):
            x = _resnet(params, f"decoder.up_blocks.{up}.resnets.{i}", x, groups)
        if up != last:
            x = _upsample(params, f"decoder.up_blocks.{up}.upsamplers.0.conv", x)
    x = jax.nn.silu(_group_norm(params, "decoder.conv_norm_out", x, groups))
    return _conv(params, "decoder.conv_out", x)


def encode(params, frames, config: VQGANConfig):
    """frames float [N, R, R, C] in [-1, 1] -> codes int32 [N, g, g]."""
    return nearest_codes(params, encode_latents(params, frames, config))


def decode(params, codes, config: VQGANConfig):
    """codes int [N, g, g] -> frames float [N, R, R, C], clipped to [-1, 1] as LWM clips them."""
    quantized = params["quantize.embedding.weight"][codes]
    return jnp.clip(decode_latents(params, quantized, config), -1, 1)


# --- frames in, frames out --------------------------------------------------------------------------------


class VQGAN:
    """A VQGAN with its parameters: uint8 frames <-> codes, a frame's codes flattened row by row."""

    def __init__(self, config: VQGANConfig, params):
        self.config, self.params = config, params
        self._encode = jax.jit(functools.partial(encode, config=config))
        self._decode = jax.jit(functools.partial(decode, config=config))

    @classmethod
    def load(cls, folder) -> "VQGAN":
        return cls(*load_diffusers(folder))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    @property
    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_frame

    def encode_frames(self, frames) -> np.ndarray:
        """uint8 frames [F, R, R, C] -> codes int32 [F, g * g]."""
        frames = np.asarray(frames)
        r, c = self.resolution, self.config.channels
        if frames.ndim != 4 or frames.shape[1:] != (r, r, c):
            raise ValueError(f"frames must be [F, {r}, {r}, {c}] for this VQGAN, got shape {frames.shape}; "
                             "resize them first (model_zoo.media.fit_frames)")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 pixels, got {frames.dtype}")
        codes = self._encode(self.params, jnp.asarray(frames, jnp.float32) / 127.5 - 1)
        return np.asarray(codes).reshape(len(frames), -1)

    def decode_codes(self, codes) -> np.ndarray:
        """codes int [F, g * g] (or [F, g, g]) -> uint8 frames [F, R, R, C]; a code outside the codebook is refused."""
        codes = np.asarray(codes)
        g = self.config.grid
        if codes.ndim not in (2, 3) or codes.shape[1:] not in ((g * g,), (g, g)):
            raise ValueError(f"codes must be [F, {g * g}] for this VQGAN, got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        bad = (codes < 0) | (codes >= self.num_codes)
        if bad.any():
            raise ValueError(f"code {int(codes[bad][0])} is outside the codebook [0, {self.num_codes})")
        frames = self._decode(self.params, jnp.asarray(codes.reshape(-1, g, g), jnp.int32))
        return np.asarray(jnp.round((frames + 1) * 127.5), np.uint8)
