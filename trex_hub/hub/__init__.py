"""Getting files: ``http`` (transport), ``cache`` (the trex_hub cache and its policy),
``partials`` (partial downloads), ``hf`` (the Hugging Face Hub); ``download`` keeps the original
module's names.

Nothing in this package knows about torch modules or the registry of models.
"""
