"""Training of t-ReX / t-ReX* (and a plain supervised baseline): ``trex-train``.

* :mod:`.augment`  multi-crop augmentation with per-sample seeded randomness (draws + PIL path)
* :mod:`.tensor_ops` Pillow's resize / colour / blur arithmetic on batched tensors (any device)
* :mod:`.batch_augment` ``--aug gpu``: workers decode, the device makes the crops in batches
* :mod:`.ocm`      OCM memory bank (FIFO of EMA projector outputs) and the EMA update
* :mod:`.module`   the training module (network, EMA copy, memory or classifier), SGD groups
* :mod:`.schedule` per-iteration lr: linear warm-up, cosine decay
* :mod:`.config`   options, presets (``trex``, ``trex_star``, ``baseline``)
* :mod:`.runtime`  processes and devices (torchrun / DDP), RNG states, checkpoints and resume
* :mod:`.data`     datasets and the training loaders of both augmentation paths
* :mod:`.loop`     the training loop: AMP, schedule, EMA, non-finite guard, logs, evaluation
* :mod:`.export`   training checkpoint -> zoo folder (safetensors + config.json + card)

Nothing heavy is imported here; import the submodules you need.
"""

__all__ = ["augment", "tensor_ops", "batch_augment", "ocm", "module", "schedule", "config",
           "runtime", "data", "loop", "export"]
