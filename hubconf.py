"""torch.hub entrypoints: ``torch.hub.load("naver/trex", "trex_star")``.

One entrypoint per released model, generated from ``trex_hub.registry``.
"""
dependencies = ["torch", "torchvision"]

from trex_hub.entrypoints import *  # noqa: E402,F401,F403
