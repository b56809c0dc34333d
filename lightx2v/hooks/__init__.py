"""Runtime features attached to a model from outside (feature caching, LoRA, offload, ...).

Each module here exposes ``apply_<feature>(model, <Feature>Config)``, returning a handle with ``remove()``; the model
files carry none of this code.
"""
