"""Datasets, augmentation presets and reproducible batches for the trainer.

    data = build_data(cfg, rank=0, world_size=1, device=torch.device("cpu"))   # reads cfg.data, cfg.aug, cfg.trainer.seed
    data.num_classes, data.classes, data.num_train, data.num_val, data.steps_per_epoch
    for images, targets in data.train_batches(epoch, start_step=0): ...   # targets (B,) long, or (B, K) soft with mixing
    for images, labels in data.val_batches(): ...                         # this rank's disjoint shard, no padding

Label smoothing is left to the loss: CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing) for both kinds of
targets (see transforms.py).
"""

from .loader import Data, build_data, derive_seed
from .sources import Split, decode_file, load_source
from .transforms import AugConfig, aug_config

__all__ = ["Data", "build_data", "derive_seed", "AugConfig", "aug_config", "Split", "decode_file", "load_source"]
