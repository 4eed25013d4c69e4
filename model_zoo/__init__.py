"""The Large World Model (LLaMA architecture) on ring attention: train, load, generate, evaluate."""

from model_zoo.config import LWM_7B, PRESETS, TINY, LWMConfig, preset
from model_zoo.hf import load_hf_checkpoint
from model_zoo.model import forward, hidden_states, init_params
from model_zoo.sharding import make_mesh

__all__ = ["LWM_7B", "LWMConfig", "PRESETS", "TINY", "forward", "hidden_states", "init_params", "load_hf_checkpoint",
           "make_mesh", "preset"]
