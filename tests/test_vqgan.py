"""LWM's VQGAN in JAX against diffusers' `VQModel` (the same network): latents and pixels to float32
rounding, codes identical but for float32 ties, at random initialisation; a diffusers folder loads,
and one saved here loads in diffusers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo.vqgan import (
    LWM_VQGAN,
    VQGAN,
    VQGANConfig,
    decode,
    encode,
    encode_latents,
    init_params,
    load_diffusers,
    nearest_codes,
    save_diffusers,
)

# The [test] extra installs torch (its CPU build) and diffusers on Python 3.11 only.
torch = pytest.importorskip("torch", reason="diffusers parity needs torch: pip install torch diffusers")
diffusers = pytest.importorskip("diffusers", reason="diffusers parity needs diffusers")

SMALL = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, z_channels=16,
                    num_codes=96, code_dim=8, norm_groups=8)


def diffusers_model(config: VQGANConfig, seed: int):
    torch.manual_seed(seed)
    model = diffusers.VQModel(**{k: v for k, v in config.to_diffusers().items() if k != "_class_name"}).eval()
    with torch.no_grad():  # norms away from 1 and 0, so a swapped or skipped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn_like(p))
    return model


def diffusers_codes_and_pixels(model, config, frames):
    """diffusers' own path: encode, quantize, then decode the codes through the codebook lookup;
    returns the codes, the pixels and the latents the codes were picked for."""
    g = config.grid
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(frames).permute(0, 3, 1, 2)).latents
        codes = model.quantize(latents)[2][2].reshape(len(frames), g, g)
        pixels = model.decode(codes.reshape(-1), force_not_quantize=True, shape=(len(frames), g, g, config.code_dim))
    return codes.numpy(), pixels.sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy(), latents.permute(0, 2, 3, 1).numpy()


def assert_same_codes_up_to_float32_ties(codes, want_codes, want_latents, codebook):
    """Codes identical, except where diffusers' latent lies as near to both codes as float32 can
    tell apart (distances in float64 within 1e-6 relative): there the two libraries' rounding picks.
    8192 random codes make such ties turn up (1 in 256 cells of the LWM configuration on some hosts)."""
    differ = np.argwhere(codes != want_codes)
    assert len(differ) <= codes.size // 100, f"{len(differ)} of {codes.size} codes differ from diffusers'"
    codebook = np.asarray(codebook, np.float64)
    for cell in map(tuple, differ):
        z = want_latents[cell].astype(np.float64)
        ours, theirs = (np.sum((z - codebook[c]) ** 2) for c in (codes[cell], want_codes[cell]))
        assert abs(ours - theirs) <= 1e-6 * theirs, (cell, codes[cell], want_codes[cell], ours, theirs)


def check_parity(config, seed, folder, frames):
    model = diffusers_model(config, seed)
    model.save_pretrained(folder)
    loaded, params = load_diffusers(folder)
    assert loaded == config
    want_codes, want_pixels, want_latents = diffusers_codes_and_pixels(model, config, frames)
    latents = jax.jit(encode_latents, static_argnums=2)(params, jnp.asarray(frames), config)
    np.testing.assert_allclose(np.asarray(latents), want_latents, atol=1e-4, rtol=0)
    codes = np.asarray(jax.jit(nearest_codes)(params, latents))  # encode = nearest_codes of encode_latents
    assert_same_codes_up_to_float32_ties(codes, want_codes, want_latents, params["quantize.embedding.weight"])
    assert len(np.unique(codes)) > 8, "the codes barely vary: the comparison would prove little"
    pixels = np.asarray(jax.jit(decode, static_argnums=2)(params, jnp.asarray(want_codes), config))
    np.testing.assert_allclose(pixels, want_pixels, atol=1e-4, rtol=0)
    assert np.abs(want_pixels).max() > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_small_configuration_matches_diffusers(tmp_path, seed):
    frames = np.random.default_rng(seed).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    check_parity(SMALL, seed, tmp_path / "vq", frames)


@pytest.mark.slow
def test_lwm_configuration_matches_diffusers(tmp_path):
    """LWM's own VQGAN (aMUSEd's VQ configuration) at 256 x 256: one frame, 256 codes."""
    assert LWM_VQGAN.tokens_per_frame == 256 and LWM_VQGAN.widths == (128, 256, 256, 512, 768)
    frames = np.random.default_rng(2).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    check_parity(LWM_VQGAN, 2, tmp_path / "vq", frames)


@pytest.mark.slow
def test_saved_folder_loads_in_diffusers(tmp_path):
    params = init_params(SMALL, jax.random.key(3))
    params["quantize.embedding.weight"] = jax.random.normal(jax.random.key(4), (SMALL.num_codes, SMALL.code_dim))
    save_diffusers(tmp_path / "vq", SMALL, params)
    model = diffusers.VQModel.from_pretrained(tmp_path / "vq").eval()
    frames = np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    want_codes, want_pixels, _ = diffusers_codes_and_pixels(model, SMALL, frames)
    np.testing.assert_array_equal(np.asarray(encode(params, jnp.asarray(frames), SMALL)), want_codes)
    np.testing.assert_allclose(np.asarray(decode(params, jnp.asarray(want_codes), SMALL)), want_pixels, atol=1e-4)


def test_uint8_frames_round_trip_and_bad_input_is_refused(tmp_path):
    model = diffusers_model(SMALL, 6)
    model.save_pretrained(tmp_path / "vq")
    vqgan = VQGAN.load(tmp_path / "vq")
    frames = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    codes = vqgan.encode_frames(frames)
    assert codes.shape == (2, SMALL.tokens_per_frame) and codes.dtype == np.int32
    want_codes, want_pixels, _ = diffusers_codes_and_pixels(model, SMALL, frames.astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(codes, want_codes.reshape(2, -1))
    pixels = vqgan.decode_codes(codes)
    assert pixels.dtype == np.uint8 and pixels.shape == frames.shape
    assert np.abs(pixels.astype(np.float32) - (want_pixels + 1) * 127.5).max() <= 1
    with pytest.raises(ValueError, match=r"frames must be \[F, 32, 32, 3\].*got shape \(2, 64, 64, 3\)"):
        vqgan.encode_frames(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"code 96 is outside the codebook \[0, 96\)"):
        vqgan.decode_codes(np.full((1, 64), 96))
    with pytest.raises(ValueError, match="codes must be"):
        vqgan.decode_codes(np.zeros((1, 63), np.int32))


def test_what_lwm_vqgan_cannot_be_is_refused(tmp_path):
    model = diffusers_model(SMALL, 8)
    model.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    (tmp_path / "vq" / "config.json").write_text(json.dumps(dict(config, mid_block_add_attention=True)))
    with pytest.raises(ValueError, match="mid_block_add_attention is True; LWM's VQGAN needs False"):
        load_diffusers(tmp_path / "vq")
    with pytest.raises(FileNotFoundError, match="is not a diffusers VQModel folder: it has no config.json"):
        load_diffusers(tmp_path)
    with pytest.raises(ValueError, match="resolution=42 must be a multiple of 4"):
        VQGANConfig(resolution=42, channel_mult=(1, 2, 2))
