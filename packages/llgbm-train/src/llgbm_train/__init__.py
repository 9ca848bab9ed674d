"""llgbm-train: configs, condition encoders, LoRA generators, losses, trainers, evaluation, CLI.

    from llgbm_train import load_config
    from llgbm_train.trainer import train
    result = train(load_config("configs/delta_multi.yaml"), Path("runs/delta_multi"))

Submodules import torch and the models lazily; importing this package reads no files.
"""

from llgbm_train.config import Config, ConfigError, load_config, save_config

__all__ = ["Config", "ConfigError", "load_config", "save_config"]
