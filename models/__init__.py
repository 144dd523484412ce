"""Flax NNX model code. Pure modules: no mesh, no optimizer, no I/O; parameters carry logical axis names."""
