"""What differs between model families (Higgs Audio v2, v3): one small interface, one object per family.

The recipe (train/), the inference code (infer/) and the app call a family through these
methods and never ask which family it is. `families/select.py` picks the family of a checkpoint
(`model.family`, default: from config.json `model_type`). Each family implements:

    load        load_processor (text tokenizer + codec), load_codec,
                special_tokens, load_model, load_for_inference
    weights     apply_finetuning (LoRA pathways / full), load_trainable, save_trainable,
                verify_trainable, parameter_report, check_adapter (an adapter of another family)
    layout      sample_layout (training sample + its token length, for the dataset and the
                sampler), collator, first_batch_report (statistics of real batches) and
                check_first_batches (raises when nothing would be learned)
    loss        scored_rows_model (True: the model's forward returns the scored rows itself;
                False: the train/loss heads module gathers them), health_spec (chance levels)
    generation  generate_codes (one request -> codes + the stop rule's verdict)

A processor is anything with `.tokenizer` (text) and `.audio_tokenizer` (the codec: `.encode`,
`.decode`, `.config.sample_rate`); requests and sampling options are duck-typed
(`infer.generate.GenerationRequest`, `SamplingOptions`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from higgs_tune.errors import HiggsTuneError

# written beside trained weights that carry no config.json (v3 full fine-tune): {"family": "v3"}
FAMILY_MARKER = "higgs_tune_family.json"


def has_usual_weights(folder: Path) -> bool:
    """`folder` holds trained weights in the usual format (what generate / export load): a PEFT
    adapter, a full model's config.json + safetensors, or v3's full weights with their family marker.
    A shards-only checkpoint of an FSDP run has none of them."""
    folder = Path(folder)
    return any((folder / m).is_file() for m in ("adapter_config.json", "config.json", FAMILY_MARKER))


class GenerationError(HiggsTuneError):
    """A generation request cannot be served (bad request, prompt longer than the context)."""


@dataclass(frozen=True)
class HealthSpec:
    """Sizes the training-signal checks need: chance level ln(codebook_size) for audio,
    ln(text_vocab_size) for text (only when the family has a text loss)."""

    codebook_size: int  # rows per codebook the audio head scores over (chance = ln of it)
    num_codebooks: int
    text_vocab_size: int
    stream_eos_id: int  # the audio label that teaches stopping (v2 stream EOS, v3 EOC)
    has_text_loss: bool = True
    structural_token_ids: frozenset[int] = frozenset()

    @property
    def audio_chance_loss(self) -> float:
        return math.log(self.codebook_size)


@dataclass
class GeneratedCodes:
    """One request's output before decoding: (K, T) codes and whether the model stopped by itself."""

    codes: torch.Tensor  # (K, T) long, real codes only
    stopped: bool
    prompt_tokens: int
    num_columns: int  # generated audio columns / rows
    max_new_tokens: int  # the limit applied


@dataclass
class Processor:
    """Text tokenizer + codec (a v2 `HiggsAudioV2Processor` has the same two attributes)."""

    tokenizer: object
    audio_tokenizer: object
    extras: dict = field(default_factory=dict)


class ModelFamily(ABC):
    """The interface; see the module docstring. Subclasses: families.v2.V2Family, families.v3.V3Family."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    scored_rows_model: bool = False
    has_text_loss: bool = True
    # files that mark a trained-weights folder (LoRA adapter / full weights) of this family
    adapter_marker: str = ""

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # ------------------------------------------------------------------ load
    @abstractmethod
    def load_processor(self, name_or_path: str | Path, audio_tokenizer=None): ...

    @abstractmethod
    def load_codec(self, name_or_path: str | Path, device="cpu"):
        """The audio codec (what `prepare` encodes clips with)."""

    @abstractmethod
    def special_tokens(self, processor, model=None): ...

    @abstractmethod
    def load_model(self, model_cfg, device=None): ...

    @abstractmethod
    def load_for_inference(
        self, model: str, folder: Path, adapter_dir: Path | None, *, dtype, audio_tokenizer, use_text_head
    ):
        """(model on the CPU with the trained weights of `adapter_dir` if given, notes for the user);
        weights of another base model or family are a ModelLoadError naming them."""

    # ------------------------------------------------------------------ trainable weights
    @abstractmethod
    def apply_finetuning(self, model, finetune_cfg): ...

    @abstractmethod
    def load_trainable(self, model, folder, is_trainable: bool = False): ...

    @abstractmethod
    def save_trainable(self, model, folder, state_dict=None): ...

    @abstractmethod
    def verify_trainable(self, model, folder, state_dict=None) -> None: ...

    @abstractmethod
    def parameter_report(self, model, finetune_cfg): ...

    # ------------------------------------------------------------------ layout
    @abstractmethod
    def sample_layout(self, data_cfg):
        """The dataset's sample builder (`data.dataset.SampleLayout`)."""

    @abstractmethod
    def collator(self, tokens, processor=None): ...

    @abstractmethod
    def first_batch_report(self, batches: list, tokens) -> tuple[dict, str]:
        """(statistics, text) of real batches (`train` and `inspect --batches` show them)."""

    @abstractmethod
    def render_sample(self, dataset, sample_id: str, tokenizer, tokens) -> str:
        """One training sample token by token beside its generation prompt (`inspect --show`)."""

    @abstractmethod
    def check_first_batches(self, stats: dict) -> None:
        """Raise TrainingHealthError when these batches would teach nothing (no trained audio, no end label)."""

    # ------------------------------------------------------------------ loss and health
    @abstractmethod
    def health_spec(self, model_config, tokenizer=None) -> HealthSpec: ...

    # ------------------------------------------------------------------ generation
    @abstractmethod
    def generate_codes(
        self, model, processor, tokens, request, options, name: str, *, synced: bool = False
    ) -> GeneratedCodes:
        """One request -> codes. `synced`: every rank of a sharded (FSDP) model runs this same call, and
        each rank's model forward passes must stay in step (no rank may stop while another still needs
        the gathered weights)."""
