"""Data: FFCV shards and their manifest (`writer`, `manifest`, `vilscale prepare` in `cli`), the sharded
loader with exact resume (`loader`, `sharding`, `pipeline`), and batch augmentation (`augment`).

Modules are imported where used (importing ffcv compiles numba code for seconds), so this package
imports nothing itself.
"""
