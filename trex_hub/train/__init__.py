"""Training of t-ReX / t-ReX* (and a plain supervised baseline): ``trex-train``.

* :mod:`.augment`  multi-crop augmentation with per-sample seeded randomness
* :mod:`.ocm`      OCM memory bank (FIFO of EMA projector outputs) and the EMA update
* :mod:`.module`   the training module (network, EMA copy, memory or classifier), SGD groups
* :mod:`.schedule` per-iteration lr: linear warm-up, cosine decay
* :mod:`.config`   options, presets (``trex``, ``trex_star``, ``baseline``)
* :mod:`.loop`     DDP / AMP / resume / JSON-lines logs / atomic checkpoints
* :mod:`.export`   training checkpoint -> zoo folder (safetensors + config.json + card)

Nothing heavy is imported here; import the submodules you need.
"""

__all__ = ["augment", "ocm", "module", "schedule", "config", "loop", "export"]
