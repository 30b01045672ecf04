"""`higgs-tune inspect --show ID` on a Higgs Audio v3 cache (tiny offline v3 stack): the training sample
position by position, its delayed rows and labels, what the loss scores, and the generation prompt beside it."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from v3_support import load_tiny_model, random_codes, tiny_tokenizer, tiny_tokens

from higgs_tune.app.cli import main
from higgs_tune.data.cache import CodeCache
from higgs_tune.errors import DataError
from higgs_tune.families.v3.checkpoint import load_v3_tokenizer
from higgs_tune.families.v3.generate import generation_prompt
from higgs_tune.families.v3.inspect import check_v3_prompt_matches
from higgs_tune.families.v3.layout import (
    BOC,
    EOC,
    IGNORE_INDEX,
    V3Tokens,
    build_v3_sample,
    collate_v3,
    delay_codes,
    target_labels,
)

CLIP, REF = "en_a_001", "en_a_000"  # the demo manifest gives en_a_001 an explicit reference: en_a_000
TEXT = "Please close the window before you leave."
REF_TEXT = "The morning train was right on time."


def _write_config(path, model, cache, out, **data):
    cfg = {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "data": {"train_cache": str(cache), "max_sequence_length": 1024, **data},
        "train": {"max_steps": 1, "seed": 42},
        "checkpoint": {"output_dir": str(out)},
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _show(model, cache, tmp_path, sample_id, **data):
    cfg = _write_config(tmp_path / "run.yaml", model, cache, tmp_path / "run", **data)
    return CliRunner().invoke(main, ["inspect", str(cache), "--config", str(cfg), "--show", sample_id])


def _norm(line: str) -> str:
    return " ".join(line.split())


def _cells(values) -> str:
    names = {BOC: "B", EOC: "E", IGNORE_INDEX: "·"}
    return " ".join(names.get(int(v), str(int(v))) for v in values)


def _by_position(output: str) -> dict[int, str]:
    return {int(line.split()[0]): _norm(line) for line in output.splitlines() if line[:5].strip().isdigit()}


@pytest.fixture(scope="module")
def clone(tiny_v3_stack, v3_demo_cache, tmp_path_factory):
    """The CLI's --show output for the voice-cloning sample en_a_001, and the cached codes it shows."""
    result = _show(tiny_v3_stack, v3_demo_cache, tmp_path_factory.mktemp("show"), CLIP, task="voice_clone")
    assert result.exit_code == 0, result.output
    cache = CodeCache.open(v3_demo_cache)
    entry = next(e for e in cache.entries if e.id == CLIP)
    assert (entry.text, entry.ref_text) == (TEXT, REF_TEXT)
    tokenizer = load_v3_tokenizer(tiny_v3_stack)
    return {
        "output": result.stdout,
        "target": cache.codes(entry.key),
        "ref": cache.codes(entry.ref_key),
        "tokenizer": tokenizer,
        "text_ids": tokenizer.encode(TEXT, add_special_tokens=False),
        "ref_text_ids": tokenizer.encode(REF_TEXT, add_special_tokens=False),
    }


def test_show_v3_voice_clone_sample(clone):
    out, target, ref = clone["output"], clone["target"], clone["ref"]
    t_frames, r_frames = target.shape[1], ref.shape[1]
    ref_start = 3 + len(clone["ref_text_ids"])  # <|tts|> <|ref_text|> transcript <|ref_audio|>
    ref_end = ref_start + r_frames + 7 - 1
    audio_pos = ref_end + 2 + len(clone["text_ids"])  # <|text|> text <|audio|>
    prompt_len = audio_pos + 1
    length = prompt_len + t_frames + 7
    lines = out.splitlines()

    assert lines[0] == (
        f"sample {CLIP}: voice_clone, reference {REF}; {length} tokens, {r_frames + t_frames + 14} audio slots "
        f"(reference {r_frames} frames -> {r_frames + 7} rows, target {t_frames} frames -> {t_frames + 7} rows), "
        "8 codebooks, data.eoc_labels: all"
    )
    assert lines[
        1
    ] == f"text: <|tts|><|ref_text|>{REF_TEXT}<|ref_audio|>[audio: {r_frames + 7} slots]<|text|>{TEXT}" + (
        f"<|audio|>[audio: {t_frames + 7} slots]"
    )
    assert lines[2].startswith("legend: SLOT = -100 in input_ids: one audio slot")
    assert (
        lines[3]
        == "        B = BOC 1024 (delay head, never a label), E = EOC 1025 (delay tail fill), · = -100 (no loss)"
    )
    assert "<|audio|> predicts target row 0, target row r predicts row r+1" in lines[4]

    pos = _by_position(out)
    assert sorted(pos) == list(range(length))  # one line per position
    assert pos[0] == "0 <|tts|> | | | <|tts|>"
    assert pos[1] == "1 <|ref_text|> | | | <|ref_text|>"
    assert pos[2] == '2 "The" | | | "The"'
    assert pos[3] == '3 " morning" | | | " morning"'
    assert pos[ref_start - 1] == f"{ref_start - 1} <|ref_audio|> | | | <|ref_audio|>"
    assert pos[audio_pos] == f"{audio_pos} <|audio|> | | row 0 | <|audio|>"

    # reference slots: the delayed reference rows as input, every label masked, the prompt holds the same slot
    ref_rows = delay_codes(ref)  # (T_ref + 7, 8)
    assert pos[ref_start] == f"{ref_start} SLOT | 0 {_cells(ref_rows[0])} {_cells([IGNORE_INDEX] * 8)} | | SLOT"
    assert (
        pos[ref_end] == f"{ref_end} SLOT | {r_frames + 6} {_cells(ref_rows[-1])} {_cells([IGNORE_INDEX] * 8)} | | SLOT"
    )

    # target slots: row r's input codes and labels at position P + r; position P + r predicts row r + 1
    rows, labels = delay_codes(target), target_labels(target, "all")
    assert _cells(rows[0]).endswith("B B B B B B B") and _cells(labels[0]).endswith("· · · · · · ·")
    assert pos[prompt_len] == f"{prompt_len} SLOT | 0 {_cells(rows[0])} {_cells(labels[0])} | row 1 |"
    assert pos[prompt_len + 7] == f"{prompt_len + 7} SLOT | 7 {_cells(rows[7])} {_cells(labels[7])} | row 8 |"
    last = length - 1
    assert _cells(labels[-1]) == f"E E E E E E E {int(target[7, -1])}"
    assert pos[last] == f"{last} SLOT | {t_frames + 6} {_cells(rows[-1])} {_cells(labels[-1])} | |"

    prompt_end = lines.index(
        f"----- prompt ends here ({prompt_len} tokens, after <|audio|>): generation continues with the target audio"
    )
    assert _norm(lines[prompt_end - 1]) == pos[audio_pos]
    assert lines[prompt_end + 1] == (
        f"----- target audio: {t_frames} frames -> {t_frames + 7} rows, positions {prompt_len}-{last}; "
        f"labelled: {8 * t_frames} codes + 28 EOC (every EOC row of the fill labelled), BOC never"
    )
    assert _norm(lines[prompt_end + 2]) == pos[prompt_len]
    marker = lines.index(
        f"----- reference audio: {r_frames} frames -> {r_frames + 7} rows, positions {ref_start}-{ref_end}; "
        "not labelled (the voice is given, never predicted)"
    )
    assert _norm(lines[marker + 1]) == pos[ref_start]
    assert lines[-1] == (
        f"prompt matches training sample up to target audio: yes ({prompt_len} tokens, {r_frames + 7} reference rows "
        "equal; prompt from families.v3.generate.generation_prompt, as generate builds it)"
    )


def test_show_v3_predicts_column_is_what_the_loss_scores(clone):
    """The positions marked "predicts row r" are exactly the positions HiggsV3Model.forward scores, and
    each is scored against the labels of target row r."""
    tokenizer = clone["tokenizer"]
    sample = build_v3_sample(
        tokenizer,
        V3Tokens.from_tokenizer(tokenizer),
        TEXT,
        target_codes=clone["target"],
        ref_codes=clone["ref"],
        ref_text=REF_TEXT,
    )
    batch = collate_v3([sample], pad_id=0)
    out = load_tiny_model()(batch["input_ids"], batch["audio_codes"], batch["audio_labels"], batch["attention_mask"])
    shown = {
        p: int(line.split("| row ")[1].split()[0])
        for p, line in _by_position(clone["output"]).items()
        if "| row " in line
    }
    scored = (out.positions - 1).tolist()  # forward reports the labelled position; the position before it predicts it
    assert sorted(shown) == scored
    labels = target_labels(clone["target"], "all")
    for i, p in enumerate(scored):
        assert torch.equal(out.target[i], labels[shown[p]])


def test_show_v3_with_first_eoc_labels(tiny_v3_stack, v3_demo_cache, tmp_path):
    result = _show(tiny_v3_stack, v3_demo_cache, tmp_path, CLIP, task="voice_clone", eoc_labels="first")
    assert result.exit_code == 0, result.output
    t_frames = next(e for e in CodeCache.open(v3_demo_cache).entries if e.id == CLIP).num_frames
    assert result.stdout.splitlines()[0].endswith("8 codebooks, data.eoc_labels: first")
    assert (
        f"; labelled: {8 * t_frames} codes + 7 EOC (one EOC per codebook labelled (the v2 rule; codebook 7 has none)), "
        "BOC never\n" in result.stdout
    )


def test_show_v3_unknown_id(tiny_v3_stack, v3_demo_cache, tmp_path):
    result = _show(tiny_v3_stack, v3_demo_cache, tmp_path, "nope", task="voice_clone")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: no clip with id 'nope' in {v3_demo_cache} (26 training clips: en_a_000, en_a_001, en_a_002, "
        "en_a_003, en_a_004, en_a_005, en_a_006, en_a_007, ...). Check the id (ids are the manifest's `id` values).\n"
    )


def test_check_v3_prompt_matches_names_the_first_difference():
    tokenizer, tokens = tiny_tokenizer(), tiny_tokens()
    ref, target = random_codes(2, seed=1), random_codes(3, seed=2)
    sample = build_v3_sample(
        tokenizer, tokens, "Hi there.", target_codes=target, ref_codes=ref, ref_text="Hello.", sample_id="s"
    )
    prompt = generation_prompt(tokenizer, tokens, "Hi there.", ref_codes=ref, ref_text="Hello.")
    assert check_v3_prompt_matches(sample, prompt, tokens) == sample["prompt_length"]

    no_transcript = generation_prompt(tokenizer, tokens, "Hi there.", ref_codes=ref)  # <|ref_audio|> at position 1
    with pytest.raises(
        DataError,
        match=rf"sample 's': the generation prompt \(\d+ tokens\) differs from the training sample before its target "
        rf"audio \({sample['prompt_length']} tokens\) at position 1 \(prompt id {tokens.ref_audio}, sample id "
        rf"{tokens.ref_text}\)",
    ):
        check_v3_prompt_matches(sample, no_transcript, tokens)

    other = ref.clone()
    other[0, 1] = (other[0, 1] + 1) % 1024  # codebook 0 of frame 1: delayed row 1
    ref_start = 3 + len(tokenizer.encode("Hello.", add_special_tokens=False))
    with pytest.raises(DataError, match=rf"at position {ref_start + 1} \(audio row: prompt \["):
        check_v3_prompt_matches(
            sample, generation_prompt(tokenizer, tokens, "Hi there.", ref_codes=other, ref_text="Hello."), tokens
        )
