"""Higgs Audio v2 (`higgs_audio_v2`): the family interface over the existing v2 code (`V2`).

Nothing v2-specific is reimplemented here: model/load.py, model/lora.py, data/layout.py,
data/dataset.py's chat layout and data/inspect.py do the work; generation is
families/v2/generate.py (moved out of infer/generate.py unchanged).
"""

from __future__ import annotations

from pathlib import Path

from higgs_tune.data.collate import Collator
from higgs_tune.data.dataset import V2SampleLayout
from higgs_tune.data.inspect import (
    batch_statistics,
    check_trainable,
    render_batch_statistics,
    render_sample,
    sample_and_prompt,
)
from higgs_tune.data.layout import SpecialTokens
from higgs_tune.data.prepare import load_audio_tokenizer
from higgs_tune.families.base import HealthSpec, ModelFamily
from higgs_tune.families.v2.generate import generate_v2_codes
from higgs_tune.families.v2.loading import check_not_v3_weights, load_v2_for_inference
from higgs_tune.model import load as v2_load
from higgs_tune.model import lora as v2_lora

# Chat markup that carries no signal as a text target. <|audio_out_bos|>, <|audio_eos|> and
# <|eot_id|> are the documented targets (start audio, stop audio, end turn): NOT in this list.
STRUCTURAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|AUDIO_OUT|>",
    "<|reserved_special_token_6|>",
    "<|finetune_right_pad_id|>",
)
ROLE_HEADERS = tuple(
    f"<|start_header_id|>{role}<|end_header_id|>\n\n" for role in ("system", "user", "assistant", "scene")
)


class V2Family(ModelFamily):
    name = "v2"
    model_types = (v2_load.MODEL_TYPE, v2_load.ORIGINAL_MODEL_TYPE)
    scored_rows_model = False
    has_text_loss = True

    # ------------------------------------------------------------------ load
    def load_processor(self, name_or_path, audio_tokenizer=None):
        return v2_load.load_processor(name_or_path, audio_tokenizer)

    def load_codec(self, name_or_path, device="cpu"):
        return load_audio_tokenizer(name_or_path, device)

    def special_tokens(self, processor, model=None):
        return SpecialTokens.from_tokenizer(processor.tokenizer, model.config if model is not None else processor)

    def load_model(self, model_cfg, device=None):
        return v2_load.load_model(model_cfg, device=device)

    def load_for_inference(self, model, folder, adapter_dir, *, dtype, audio_tokenizer, use_text_head):
        return load_v2_for_inference(
            model, folder, adapter_dir, dtype=dtype, audio_tokenizer=audio_tokenizer, use_text_head=use_text_head
        )

    # ------------------------------------------------------------------ trainable weights
    def apply_finetuning(self, model, finetune_cfg):
        return v2_lora.apply_finetuning(model, finetune_cfg)

    def load_trainable(self, model, folder, is_trainable: bool = False):
        check_not_v3_weights(Path(folder))
        return v2_lora.load_trainable(model, folder, is_trainable=is_trainable)

    def save_trainable(self, model, folder, state_dict=None):
        return v2_lora.save_trainable(model, folder, state_dict)

    def verify_trainable(self, model, folder, state_dict=None) -> None:
        v2_lora.verify_trainable(model, folder, state_dict)

    def parameter_report(self, model, finetune_cfg):
        return v2_lora.parameter_report(model, finetune_cfg)

    # ------------------------------------------------------------------ layout
    def sample_layout(self, data_cfg):
        return V2SampleLayout(data_cfg.system_prompt, data_cfg.use_scene)

    def collator(self, tokens, processor=None):
        return Collator(tokens)

    def first_batch_report(self, batches: list, tokens) -> tuple[dict, str]:
        stats = batch_statistics(batches, tokens.stream_bos, tokens.stream_eos)
        return stats, render_batch_statistics(stats)

    def render_sample(self, dataset, sample_id: str, tokenizer, tokens) -> str:
        sample, prompt = sample_and_prompt(dataset, sample_id)
        return render_sample(sample, prompt, tokenizer, tokens)

    def check_first_batches(self, stats: dict) -> None:
        check_trainable(stats)

    # ------------------------------------------------------------------ loss and health
    def health_spec(self, model_config, tokenizer=None) -> HealthSpec:
        structural = {model_config.audio_token_id, model_config.audio_delay_token_id}
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(model_config, name, None) is not None:
                structural.add(getattr(model_config, name))
        if tokenizer is not None:
            unk = tokenizer.unk_token_id
            structural.update(
                i for i in tokenizer.convert_tokens_to_ids(list(STRUCTURAL_TOKENS)) if i is not None and i != unk
            )
            if tokenizer.pad_token_id is not None:
                structural.add(tokenizer.pad_token_id)
            # role names and "\n\n" as the tokenizer splits them inside a header
            for header in ROLE_HEADERS:
                structural.update(tokenizer(header, add_special_tokens=False)["input_ids"])
        return HealthSpec(
            codebook_size=model_config.codebook_size,
            num_codebooks=model_config.num_codebooks,
            text_vocab_size=model_config.vocab_size,
            stream_eos_id=model_config.audio_stream_eos_id,
            has_text_loss=True,
            structural_token_ids=frozenset(int(i) for i in structural),
        )

    # ------------------------------------------------------------------ generation
    def generate_codes(self, model, processor, tokens, request, options, name: str, *, synced: bool = False):
        return generate_v2_codes(model, processor, tokens, request, options, name, synced=synced)


V2 = V2Family()
