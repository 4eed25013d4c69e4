"""VQGAN training started from a trained VQGAN: its encoder and decoder carry over, its codebook is
refit (another size allowed), another architecture is refused."""

import dataclasses

import numpy as np
import pytest

from model_zoo.vqgan import load_diffusers
from model_zoo.vqgan_train import WORLD_VQGAN, VQGANTraining, train_vqgan

CODEBOOK = "quantize.embedding.weight"


def test_a_run_starts_from_a_trained_vqgan_with_a_codebook_of_its_own(tmp_path):
    first = VQGANTraining(steps=2, autoencoder_steps=1, restart_every=1, save_every=2, seed=3)
    train_vqgan(first, tmp_path / "first", progress=False)
    _, trained = load_diffusers(tmp_path / "first" / "vqgan")
    refit = dataclasses.replace(first, config=dataclasses.replace(WORLD_VQGAN, num_codes=8), steps=0,
                                autoencoder_steps=0, seed=4, init_from=str(tmp_path / "first" / "vqgan"))
    train_vqgan(refit, tmp_path / "refit", progress=False)
    config, started = load_diffusers(tmp_path / "refit" / "vqgan")
    assert config.num_codes == 8 and started[CODEBOOK].shape == (8, WORLD_VQGAN.code_dim)
    for name, value in trained.items():
        if name != CODEBOOK:
            np.testing.assert_array_equal(started[name], value, err_msg=name)
    assert np.std(trained["encoder.conv_in.weight"]) > 0  # not a comparison of constants

    other = dataclasses.replace(refit, config=dataclasses.replace(WORLD_VQGAN, hidden_channels=8))
    with pytest.raises(ValueError, match="another architecture.*only num_codes may differ"):
        train_vqgan(other, tmp_path / "other", progress=False)
