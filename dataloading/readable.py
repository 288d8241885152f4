"""Whether PIL can read an image file: the check behind `python -m dataloading.validate` and behind the
DALI loader's message when a batch fails to decode. Imports no torch, so the validator starts fast."""

from __future__ import annotations

from PIL import Image


def check_image(path: str) -> str | None:
    """None if PIL can verify and fully decode `path`, else the error as text."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable: reopen to decode every pixel
            im.load()
    except Exception as e:  # noqa: BLE001 (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
    return None
