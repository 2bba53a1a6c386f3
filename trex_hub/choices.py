"""The values the extraction options take, in a module that imports nothing heavy: the library
checks its arguments against them and ``trex-extract`` offers them in ``--help``, which then
answers without loading torch."""

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DECODES = ("auto", "cpu", "gpu", "hybrid")
WORKER_MODES = ("auto", "threads", "processes")
# the most pixels any image may have, whatever max_pixels says: 1 gigapixel is about 3 GB decoded
MAX_PIXELS_CEILING = 1_000_000_000

__all__ = ["PRECISIONS", "DECODES", "WORKER_MODES", "MAX_PIXELS_CEILING"]
