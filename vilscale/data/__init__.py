"""Data: FFCV shards and their manifest (`writer`, `manifest`, `vilscale prepare` in `cli`), the sharded
loader with exact resume (`loader`, `sharding`, `pipeline`; training decodes only the part of each JPEG its
crop needs with `cropdecode`, a small C extension), and batch augmentation (`augment`).

Modules are imported where used (importing ffcv compiles numba code for seconds), so this package
imports nothing itself.
"""
