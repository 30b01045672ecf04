"""Build a tiny, random-weight Higgs Audio v2 stack offline (`higgs-tune make-tiny`).

The stack is saved with the same `save_pretrained` calls and folder layout as a real
checkpoint converted for `transformers`, so every loader in higgs-tune reads it through
exactly the code path used for `bosonai/higgs-audio-v2-generation-3B-base`:

    OUT/
      config.json, model.safetensors, generation_config.json   HiggsAudioV2ForConditionalGeneration
      tokenizer.json, tokenizer_config.json, chat_template.jinja   the text tokenizer
      preprocessor_config.json, processor_config.json               the processor
      audio_tokenizer/config.json, model.safetensors                HiggsAudioV2TokenizerModel
      higgs_tune_tiny.json                                          how it was built (seed, sizes)

Nothing is downloaded. The text tokenizer is a byte-level BPE trained on bundled English
and Arabic text, with the 256 Llama-3 special tokens (Higgs names included) appended after
the regular vocabulary; the model config's special-token ids are read back from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
    PreTrainedTokenizerFast,
)

from higgs_tune.resources import chat_template, text_corpus_lines
from higgs_tune.runfs import claim, describe_names, remove_owned, split_owned

# Higgs chat markup, in the order of Llama-3's special-token block (offset 0 = <|begin_of_text|>).
# Higgs renamed some reserved tokens; the ids the model uses are read from the tokenizer.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
    11: "<|audio_bos|>",
    12: "<|audio_eos|>",
    13: "<|audio_out_bos|>",
    14: "<|reserved_special_token_6|>",  # the audio delay token
    15: "<|AUDIO|>",
    16: "<|AUDIO_OUT|>",
    17: "<|scene_desc_start|>",
    18: "<|scene_desc_end|>",
}
NUM_SPECIAL_TOKENS = 256
SYSTEM_PROMPT = "Generate audio following instruction."


def special_token_names() -> list[str]:
    """The 256 special tokens in id order: Higgs names where set, else Llama-3 reserved names."""
    names, reserved = [], 0
    for offset in range(NUM_SPECIAL_TOKENS):
        if offset in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[offset])
        else:
            while f"<|reserved_special_token_{reserved}|>" in _NAMED_SPECIALS.values():
                reserved += 1
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny stack. Defaults give ~1.5M model parameters and a ~1 MB codec."""

    seed: int = 0
    bpe_vocab_size: int = 1792  # regular tokens; +256 specials = 2048
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    num_codebooks: int = 8
    audio_codebook_size: int = 1024  # codes per codebook; the model adds stream BOS/EOS rows
    sample_rate: int = 24000


class OutputDirNotEmpty(Exception):
    """make-tiny was pointed at a non-empty folder without overwrite."""


def train_corpus_bpe(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on the bundled English+Arabic corpus
    (the regular vocabulary of both tiny stacks; each appends its own special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(text_corpus_lines(), trainer=trainer)
    return tok


def build_text_tokenizer(spec: TinySpec):
    """Byte-level BPE trained on the bundled English+Arabic corpus, Llama-3 specials appended."""
    tok = train_corpus_bpe(spec.bpe_vocab_size)
    if tok.get_vocab_size() > spec.bpe_vocab_size:
        raise RuntimeError(f"BPE vocabulary {tok.get_vocab_size()} exceeds {spec.bpe_vocab_size}")
    # Pad the regular vocabulary to exactly bpe_vocab_size so the special block starts at a
    # fixed id, as Llama-3's does at 128000.
    filler = [f"<|unused_{i}|>" for i in range(spec.bpe_vocab_size - tok.get_vocab_size())]
    if filler:
        tok.add_tokens(filler)
    tok.add_special_tokens(special_token_names())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template()
    return fast


def build_audio_tokenizer(spec: TinySpec):
    """A tiny HiggsAudioV2TokenizerModel: 8 codebooks, hop 960 (25 frames/s at 24 kHz)."""
    frame_rate, nbits = 25, 10
    config = HiggsAudioV2TokenizerConfig(
        # num_quantizers = 1000 * bandwidth // (frame_rate * nbits) -> 8 at 2 kbps
        target_bandwidths=[0.5, 1.0, 1.5, spec.num_codebooks * frame_rate * nbits / 1000],
        sample_rate=spec.sample_rate,
        codebook_size=spec.audio_codebook_size,
        codebook_dim=16,
        acoustic_model_config={
            "encoder_hidden_size": 4,
            "downsampling_ratios": [8, 5, 4, 6],  # hop 960
            "decoder_hidden_size": 32,
            "upsampling_ratios": [8, 5, 4, 6],
            "hidden_size": 16,
            "sampling_rate": spec.sample_rate,
        },
        semantic_model_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [16] * 7,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
            "layerdrop": 0.0,
        },
    )
    model = HiggsAudioV2TokenizerModel(config).eval()
    if config.num_quantizers != spec.num_codebooks:
        raise RuntimeError(f"tiny codec has {config.num_quantizers} quantizers, wanted {spec.num_codebooks}")
    # A fresh codec's codebooks are all zero (every frame -> code 0): randomise them so codes vary.
    g = torch.Generator().manual_seed(spec.seed + 1)
    for layer in model.quantizer.quantizers:
        book = layer.codebook
        book.embed.copy_(torch.randn(book.embed.shape, generator=g))
        book.embed_avg.copy_(book.embed)
    return model


def build_model(spec: TinySpec, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    config = HiggsAudioV2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        num_codebooks=spec.num_codebooks,
        codebook_size=spec.audio_codebook_size + 2,  # + stream BOS and EOS rows
        audio_stream_bos_id=spec.audio_codebook_size,
        audio_stream_eos_id=spec.audio_codebook_size + 1,
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        pad_token_id=ids("<|end_of_text|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
    )
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        ras_win_len=7,
        ras_win_max_num_repeat=2,
    )
    return model


def build_processor(tokenizer, audio_tokenizer):
    feature_extractor = DacFeatureExtractor(
        feature_size=1,
        hop_length=1,
        padding_side="right",
        padding_value=0.0,
        sampling_rate=audio_tokenizer.config.sample_rate,
        return_attention_mask=True,
    )
    return HiggsAudioV2Processor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        audio_tokenizer=audio_tokenizer,
        chat_template=tokenizer.chat_template,
        audio_stream_bos_id=audio_tokenizer.config.codebook_size,
        audio_stream_eos_id=audio_tokenizer.config.codebook_size + 1,
    )


def make_tiny(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build and save the tiny stack into `out_dir`; refuses a non-empty folder unless overwrite."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirNotEmpty(f"{out} exists and is not a folder; choose another path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirNotEmpty(
                f"{out} is not empty ({len(list(out.iterdir()))} entries); "
                "pass --overwrite to replace its contents, or choose an empty folder."
            )
        clear_owned_folder(out, OutputDirNotEmpty)
    spec = TinySpec(seed=seed)
    torch.manual_seed(seed)
    tokenizer = build_text_tokenizer(spec)
    audio_tokenizer = build_audio_tokenizer(spec)
    torch.manual_seed(seed)
    model = build_model(spec, tokenizer)
    processor = build_processor(tokenizer, audio_tokenizer)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    audio_tokenizer.save_pretrained(out / "audio_tokenizer")
    # The processor records where its audio tokenizer lives (a hub id for the real one);
    # an absolute path lets plain `HiggsAudioV2Processor.from_pretrained(out)` work too.
    # higgs-tune's own loader looks in `out/audio_tokenizer/` first, so moving `out` is fine.
    audio_tokenizer.name_or_path = str((out / "audio_tokenizer").resolve())
    processor.save_pretrained(out)
    # save_pretrained does not record use_text_head; the loader reads this marker instead.
    (out / "higgs_tune_tiny.json").write_text(json.dumps({"spec": asdict(spec), "use_text_head": True}, indent=2))
    claim(out, *(p.name for p in out.iterdir()))  # all of it is ours: a later --overwrite removes exactly this
    return out


def clear_owned_folder(out: Path, error: type[Exception]) -> None:
    """--overwrite of a make-tiny folder: remove what an earlier make-tiny wrote (its ownership
    manifest lists it); refuse, naming them, when the folder holds anything else."""
    ours, foreign = split_owned(out)
    if foreign:
        raise error(
            f"{out} holds files make-tiny did not write ({describe_names(foreign)}); --overwrite removes only "
            "make-tiny's own files and never these. Move them away or choose an empty folder."
        )
    remove_owned(out, ours)
