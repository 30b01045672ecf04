"""Higgs Audio v2 generation of one request: prompt (data/layout.build_prompt) -> the model's
own `generate` -> codes with the delay pattern reverted. Called by infer/generate.generate_speech,
which owns the loop over requests, the seeds and the decoding to audio."""

from __future__ import annotations

import logging

from higgs_tune.data.layout import build_prompt, generated_codes
from higgs_tune.families.base import GeneratedCodes, GenerationError

logger = logging.getLogger("higgs_tune.infer.generate")


def generate_v2_codes(model, processor, tokens, request, options, name: str, *, synced: bool = False) -> GeneratedCodes:
    """One request -> GeneratedCodes; `model` in eval mode, the caller holds the RNG.

    `synced`: every rank of a sharded model runs this call; transformers' `synced_gpus` keeps a rank that
    has finished running forward passes until every rank has (each pass gathers the shards)."""
    context = model.config.max_position_embeddings  # a PeftModel forwards .config to the wrapped model
    min_columns = tokens.num_columns(1)  # BOS column + one frame through the delay + EOS column
    device = next(model.parameters()).device
    prompt = build_prompt(
        request.conversation(), processor.tokenizer, tokens, ref_codes=request.ref_codes, sample_id=name
    )
    prompt_len = prompt["input_ids"].shape[1]
    room = context - prompt_len
    if room < min_columns:
        ref_cols = prompt["audio_input_ids"].shape[1] if "audio_input_ids" in prompt else 0
        raise GenerationError(
            f"{name}: the prompt is {prompt_len} tokens ({ref_cols} of them reference audio, the rest text), "
            f"but the model's context (max_position_embeddings) is {context} and one frame of audio needs "
            f"{min_columns} more. Shorten the text (split it into sentences) or use a shorter reference clip."
        )
    limit = min(options.max_new_tokens, room)
    if limit < options.max_new_tokens:
        logger.info(
            "%s: max_new_tokens %d capped to %d by the model's context of %d tokens",
            name,
            options.max_new_tokens,
            limit,
            context,
        )
    gen_config = options.generation_config(model.generation_config, limit)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    prompt_columns = prompt["audio_input_ids"].shape[1] if "audio_input_ids" in prompt else 0
    out = model.generate(**prompt, generation_config=gen_config, synced_gpus=synced)
    audio = out.audio_sequences[0].cpu()  # (N_prompt + N_generated, K)
    generated = audio[prompt_columns:]
    stopped = bool(generated.shape[0] > 0 and (generated[-1] == tokens.stream_eos).all())
    # A stream BOS the model draws after the forced opening has no codec meaning; like
    # HiggsAudioV2Processor.batch_decode, clip it into the code range.
    codes = generated_codes(audio, prompt_columns, tokens).clamp(0, tokens.stream_bos - 1)
    return GeneratedCodes(
        codes=codes,
        stopped=stopped,
        prompt_tokens=prompt_len,
        num_columns=int(generated.shape[0]),
        max_new_tokens=limit,
    )
