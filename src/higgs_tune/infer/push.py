"""Upload an export or a run's final adapter to the Hugging Face Hub (`huggingface_hub.HfApi`).

    push_export("exports/my-voice", "me/my-voice")      export --push-to-hub me/my-voice
    push_checkpoint("runs/x/final", "me/my-voice-lora") train with checkpoint.push_to_hub

An export's processor_config.json names its audio tokenizer by Hub id when the codec has one:
the folder is uploaded as it is, without its audio_tokenizer/ copy (the codec is on the Hub
already). Otherwise it names a local path, which transformers resolves on its own (never
relative to the repo), so the audio tokenizer goes to its own repo `<repo>-audio-tokenizer`
and the uploaded processor_config.json names that repo. Either way
`AutoProcessor.from_pretrained("me/my-voice")` finds it. A checkpoint is uploaded without
its resume state (training_state.pt: optimizer moments, as large as the trained weights twice).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi

from higgs_tune.errors import ModelLoadError
from higgs_tune.model.hub import is_hub_id

AUDIO_TOKENIZER_DIR = "audio_tokenizer"
RESUME_ONLY_FILES = ["training_state.pt"]


def tokenizer_repo(repo_id: str) -> str:
    return f"{repo_id}-audio-tokenizer"


def push_export(
    folder: str | Path, repo_id: str, *, private: bool = False, api: HfApi | None = None
) -> tuple[str, str]:
    """Upload an export folder (its audio tokenizer to `<repo_id>-audio-tokenizer` unless it has a
    Hub id); return the repo URL and the Hub id the uploaded processor names the audio tokenizer by."""
    folder = Path(folder)
    config_path = folder / "processor_config.json"
    if not config_path.is_file() or not (folder / AUDIO_TOKENIZER_DIR).is_dir():
        raise ModelLoadError(
            f"{folder} is not an export (no processor_config.json / audio_tokenizer/): run export first."
        )
    api = api or HfApi()
    processor_config = json.loads(config_path.read_text(encoding="utf-8"))
    recorded = processor_config["audio_tokenizer"]["audio_tokenizer_name_or_path"]
    if is_hub_id(recorded):
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            ignore_patterns=[f"{AUDIO_TOKENIZER_DIR}/*"],
            commit_message="higgs-tune export",
        )
        return str(url), recorded
    codec_repo = tokenizer_repo(repo_id)
    processor_config["audio_tokenizer"]["audio_tokenizer_name_or_path"] = codec_repo
    api.create_repo(codec_repo, exist_ok=True, private=private)
    api.upload_folder(
        folder_path=str(folder / AUDIO_TOKENIZER_DIR), repo_id=codec_repo, commit_message="audio tokenizer (higgs-tune)"
    )
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        ignore_patterns=[f"{AUDIO_TOKENIZER_DIR}/*", "processor_config.json"],
        commit_message="higgs-tune export",
    )
    api.upload_file(
        path_or_fileobj=(json.dumps(processor_config, indent=2) + "\n").encode("utf-8"),
        path_in_repo="processor_config.json",
        repo_id=repo_id,
        commit_message=f"processor: audio tokenizer from {codec_repo}",
    )
    return str(url), codec_repo


def push_checkpoint(folder: str | Path, repo_id: str, *, private: bool = False, api: HfApi | None = None) -> str:
    """Upload a run's checkpoint folder (adapter or full weights, model card, config) without its resume state."""
    api = api or HfApi()
    url = api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, ignore_patterns=RESUME_ONLY_FILES, commit_message="higgs-tune run"
    )
    return str(url)
