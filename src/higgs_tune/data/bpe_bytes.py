"""The bytes behind a byte-level BPE token (GPT-2 / Llama-3 tokenizers).

Such a tokenizer writes every byte as a printable stand-in character: a token's piece
(`convert_ids_to_tokens`) is a string of stand-ins. A token can hold part of a multi-byte
UTF-8 character (an Arabic diacritic, CJK, emoji), so decoding it alone gives U+FFFD;
`piece_bytes` gives its bytes instead.
"""

from __future__ import annotations


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet (printable stand-in -> byte)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def piece_bytes(piece) -> bytes | None:
    """The bytes of a byte-level BPE piece, or None when `piece` is not one (empty, not a str,
    or a character outside the byte alphabet, e.g. a special token's name)."""
    if not isinstance(piece, str) or not piece or any(c not in BYTE_DECODER for c in piece):
        return None
    return bytes(BYTE_DECODER[c] for c in piece)
