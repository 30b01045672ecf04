"""Higgs Audio v2 (`higgs_audio_v2`) behind the family interface: family.V2 wraps the existing v2
code (model/load.py, model/lora.py, data/layout.py, data/dataset.py's chat layout, data/inspect.py);
generate.py and loading.py hold the v2 halves of infer/generate.py and infer/loading.py."""
