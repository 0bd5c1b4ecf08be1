"""Data: image lists, robust image loading, transforms, samplers and benchmark datasets.

Submodules are imported explicitly (``from cfcd.data.gnd import load_gnd``); this package
imports nothing itself, so ``cfcd evaluate`` and other light commands stay fast to start.
"""
