"""Crossing the project's border: HuggingFace family tables (families, layout), import of HF folders into sharded
parameters (hf_import), export to HF and PEFT folders (hf_export, peft_export, export_run), pretrained starting
points for `train.init_from` (pretrained) and `meshforge sample` (sample). Folders are read and written with
`safetensors` and JSON only: transformers and PyTorch are imported by nothing a run uses, only by the generation
benchmark (bench_generate) and the tests."""
