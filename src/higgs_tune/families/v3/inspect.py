"""`higgs-tune inspect --show ID` for Higgs Audio v3: one training sample position by position.

The sample is the dataset's own (`TTSDataset.__getitem__` -> `V3SampleLayout.build` ->
`layout.build_v3_sample`, what `train` batches); the prompt beside it is the one generation
builds for the same clip (`generate.generation_prompt`, the function `generate_v3` calls), and
`check_v3_prompt_matches` proves the two agree up to the target audio, id for id and row for row.

Per position: the token (text decoded, prompt markers by name, SLOT for an audio slot), for a
slot its row (index in its clip's T + 7 delayed rows), the K input codes of that row and the K
labels stored there, which target row the position's output is scored against (the loss,
`HiggsV3Model.forward`, scores position t against the labels of t + 1), and the prompt's token.
"""

from __future__ import annotations

import torch

from higgs_tune.data.inspect import MASK, code_text, collapsed_text, token_text, training_index
from higgs_tune.errors import DataError
from higgs_tune.families.v3.generate import generation_prompt
from higgs_tune.families.v3.layout import (
    AUDIO_SLOT,
    BOC,
    EOC,
    IGNORE_INDEX,
    ROLE_REFERENCE,
    ROLE_TARGET,
    V3Sample,
    V3Tokens,
)

SLOT = "SLOT"
EOC_RULES = {
    "all": "every EOC row of the fill labelled",
    "first": "one EOC per codebook labelled (the v2 rule; codebook 7 has none)",
}


def v3_sample_and_prompt(dataset, sample_id: str) -> tuple[V3Sample, V3Sample]:
    """The training sample `sample_id` of the dataset's current epoch and the prompt generation builds for it
    (the clip's text, and the sample's reference codes and transcript when it clones a voice)."""
    index = training_index(dataset, sample_id)
    sample = dataset[index]
    plan, entry = dataset.plan(index), dataset.entries[index]
    ref_codes = dataset.cache.codes(plan.ref_key) if plan.ref_key is not None else None
    prompt = generation_prompt(
        dataset.tokenizer, dataset.tokens, entry.text, ref_codes=ref_codes, ref_text=plan.ref_text
    )
    return sample, prompt


def check_v3_prompt_matches(sample: V3Sample, prompt: V3Sample, tokens: V3Tokens) -> int:
    """Assert that the generation prompt equals the training sample up to its first target slot.

    Equal means the same `input_ids` and, at every (reference) slot, the same delayed row of
    codes; the prompt must end with `<|audio|>` right before the target. Returns the prompt
    length P; raises DataError naming the first differing position otherwise.
    """
    sid = sample.get("sample_id", "")
    target = (sample["audio_roles"] == ROLE_TARGET).nonzero().flatten()
    if target.numel() == 0:
        raise DataError(f"sample {sid!r} has no target audio rows; a training sample has one target clip.")
    cut = int(target[0])
    s_ids, p_ids = sample["input_ids"], prompt["input_ids"]
    s_codes, p_codes = sample["audio_codes"], prompt["audio_codes"]
    n = min(int(p_ids.shape[0]), cut)
    diff, detail = None, ""
    for pos in range(n):
        a, b = int(p_ids[pos]), int(s_ids[pos])
        if a != b:
            diff, detail = pos, f" (prompt id {a}, sample id {b})"
            break
        if a == AUDIO_SLOT and not torch.equal(p_codes[pos], s_codes[pos]):
            diff = pos
            detail = f" (audio row: prompt {p_codes[pos].tolist()}, sample {s_codes[pos].tolist()})"
            break
    if diff is None and int(p_ids.shape[0]) != cut:
        diff = n
    if diff is not None:
        raise DataError(
            f"sample {sid!r}: the generation prompt ({int(p_ids.shape[0])} tokens) differs from the training sample "
            f"before its target audio ({cut} tokens) at position {diff}{detail}. Training and inference would see "
            "different layouts; both must come from higgs_tune.families.v3.layout.build_v3_sample."
        )
    if int(s_ids[cut - 1]) != tokens.audio:
        raise DataError(
            f"sample {sid!r}: the prompt does not end with <|audio|> before the target; the layout is broken."
        )
    return cut


def _segments(roles: torch.Tensor) -> dict[int, tuple[int, int, int]]:
    """{role: (first position, last position, rows)} of the reference and target slots."""
    out = {}
    for role in (ROLE_REFERENCE, ROLE_TARGET):
        where = (roles == role).nonzero().flatten()
        if where.numel():
            out[role] = (int(where[0]), int(where[-1]), int(where.numel()))
    return out


def render_v3_sample(sample: V3Sample, prompt: V3Sample, tokenizer, tokens: V3Tokens, eoc_labels: str) -> str:
    """One v3 sample position by position beside its generation prompt (see the module docstring).

    Raises DataError (via `check_v3_prompt_matches`) when prompt and sample disagree before the
    target audio.
    """
    cut = check_v3_prompt_matches(sample, prompt, tokens)
    k = tokens.num_codebooks
    special_ids = set(tokens.special_ids) | set(tokenizer.all_special_ids)
    ids = [int(t) for t in sample["input_ids"]]
    p_ids = [int(t) for t in prompt["input_ids"]]
    codes, labels, roles = sample["audio_codes"], sample["audio_labels"], sample["audio_roles"]
    segs = _segments(roles)
    labelled = (labels != IGNORE_INDEX).any(-1).tolist()  # (L,) the positions the loss scores against

    def row(pos: int) -> int:
        return pos - segs[int(roles[pos])][0]

    def tok(t: int) -> str:
        return SLOT if t == AUDIO_SLOT else token_text(tokenizer, t, special_ids)

    t_first, t_last, t_rows = segs[ROLE_TARGET]
    audio = []
    if ROLE_REFERENCE in segs:
        audio.append(f"reference {sample['ref_frames']} frames -> {segs[ROLE_REFERENCE][2]} rows")
    audio.append(f"target {sample['target_frames']} frames -> {t_rows} rows")
    ref = sample.get("reference")
    head = [
        f"sample {sample['sample_id']}: {sample['task']}"
        + (f", reference {ref}" if ref else "")
        + f"; {len(ids)} tokens, {ids.count(AUDIO_SLOT)} audio slots ({', '.join(audio)}), {k} codebooks, "
        f"data.eoc_labels: {eoc_labels}",
        "text: " + collapsed_text(tokenizer, ids, {AUDIO_SLOT}, "slots"),
        f"legend: {SLOT} = -100 in input_ids: one audio slot, its input the sum of the {k} table rows of one delayed "
        f"row (row = index in its clip's T+{k - 1} rows)",
        f"        B = BOC {BOC} (delay head, never a label), E = EOC {EOC} (delay tail fill), {MASK} = -100 (no loss)",
        "        labels sit at the slot carrying the row; the loss scores position p's output against the labels of "
        "p+1 (predicts: <|audio|> predicts target row 0, target row r predicts row r+1)",
        "",
    ]
    tok_w = max(12, *(len(tok(t)) for t in ids))
    code_w = len(str(EOC))
    codes_w = k * (code_w + 1) - 1
    pred_w = max(len("predicts"), len(f"row {t_rows - 1}"))
    lines = head + [
        f"{'pos':>5}  {'token':<{tok_w}} | {'row':>4}  {f'input k0..k{k - 1}':<{codes_w}}  "
        f"{f'label k0..k{k - 1}':<{codes_w}} | {'predicts':<{pred_w}} | prompt"
    ]
    for pos, t in enumerate(ids):
        if pos == cut:
            lines.append(
                f"----- prompt ends here ({cut} tokens, after <|audio|>): generation continues with the target audio"
            )
        if pos == t_first:
            t_labels = labels[t_first : t_last + 1]
            n_eoc = int((t_labels == EOC).sum())
            n_codes = int(((t_labels != IGNORE_INDEX) & (t_labels != EOC)).sum())
            lines.append(
                f"----- target audio: {sample['target_frames']} frames -> {t_rows} rows, positions {t_first}-{t_last}; "
                f"labelled: {n_codes} codes + {n_eoc} EOC ({EOC_RULES[eoc_labels]}), BOC never"
            )
        if ROLE_REFERENCE in segs and pos == segs[ROLE_REFERENCE][0]:
            r_first, r_last, r_rows = segs[ROLE_REFERENCE]
            lines.append(
                f"----- reference audio: {sample['ref_frames']} frames -> {r_rows} rows, positions {r_first}-{r_last}; "
                "not labelled (the voice is given, never predicted)"
            )
        if t == AUDIO_SLOT:
            ins = " ".join(f"{code_text(int(v), tokens):>{code_w}}" for v in codes[pos])
            labs = " ".join(f"{code_text(int(v), tokens):>{code_w}}" for v in labels[pos])
            slot = f"{row(pos):>4}  {ins}  {labs}"
        else:
            slot = f"{'':>4}  {'':<{codes_w}}  {'':<{codes_w}}"
        pred = f"row {row(pos + 1)}" if pos + 1 < len(ids) and labelled[pos + 1] else ""
        p_s = tok(p_ids[pos]) if pos < len(p_ids) else ""
        lines.append(f"{pos:>5}  {tok(t):<{tok_w}} | {slot} | {pred:<{pred_w}} | {p_s}".rstrip())
    ref_rows = segs[ROLE_REFERENCE][2] if ROLE_REFERENCE in segs else 0
    lines.append("")
    lines.append(
        f"prompt matches training sample up to target audio: yes ({cut} tokens, {ref_rows} reference rows equal; "
        "prompt from families.v3.generate.generation_prompt, as generate builds it)"
    )
    return "\n".join(lines)


def render_v3_dataset_sample(dataset, sample_id: str, tokenizer, tokens: V3Tokens) -> str:
    """`V3Family.render_sample`: the dataset's sample `sample_id` beside its generation prompt."""
    sample, prompt = v3_sample_and_prompt(dataset, sample_id)
    return render_v3_sample(sample, prompt, tokenizer, tokens, dataset.layout.eoc_labels)
