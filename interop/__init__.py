"""Crossing the project's border: HuggingFace family tables (families), import of HF folders into sharded
parameters (hf_import) and export of parameters to HF folders (hf_export). transformers and PyTorch are never
imported here: folders are read and written with `safetensors` and JSON only."""
