"""Getting files: plain HTTP(S) downloads into the cache, and the Hugging Face Hub.

Nothing in this package knows about torch modules.
"""
