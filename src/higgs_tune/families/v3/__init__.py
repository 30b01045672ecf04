"""Higgs Audio v3 (`higgs_multimodal_qwen3`): layout, model, checkpoint key map, generation, tiny stack.

The family-specific parts, as plain functions and classes for a family interface to wrap:
layout.build_v3_sample (samples and prompts), model.HiggsV3Model / apply_v3_lora (loss heads,
LoRA pathways), checkpoint.load_v3_checkpoint / save_v3_checkpoint (released key map),
generate.generate_v3 (stop rule), tiny.make_tiny_v3.
"""
