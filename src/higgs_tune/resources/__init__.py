"""Files bundled with the package: the chat template and the tokenizer training corpus."""

from importlib.resources import files


def chat_template() -> str:
    """The Higgs Audio v2 chat template (Jinja) that make-tiny installs on the processor."""
    return files(__name__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def text_corpus_lines() -> list[str]:
    """English + Arabic sentences the tiny BPE tokenizer is trained on."""
    text = files(__name__).joinpath("text_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
