"""Which image stands for a Hugging Face repo (services.download.huggingface.thumbnail_url): the card's gallery
first, else the first image file at the top of the repo or of the subfolder installed; a gallery path that
climbs out of the repo, or that is no image, is passed over."""

from __future__ import annotations

from typing import Any

import pytest

from modelbus.services.download.huggingface import thumbnail_url
from modelbus.services.download.sources import HFSource

HUB, COMMIT = "https://hub.example", "c0ffee"
RESOLVE = f"{HUB}/acme/repo/resolve/{COMMIT}"


def _info(widget: Any = None, files: tuple[str, ...] = ()) -> dict[str, Any]:
    card = {} if widget is None else {"widget": widget}
    return {"cardData": card, "siblings": [{"rfilename": f} for f in files]}


@pytest.mark.parametrize(("info", "subfolder", "expected"), [
    (_info([{"text": "a", "output": {"url": "images/a.png"}}], ("b.jpg",)), None, f"{RESOLVE}/images/a.png"),
    (_info([{"output": {"url": "./a b.webp"}}]), None, f"{RESOLVE}/a%20b.webp"),
    (_info([{"output": {"url": "https://cdn.example/x.jpeg?v=1"}}]), None, "https://cdn.example/x.jpeg?v=1"),
    (_info({"output": {"url": "one.png"}}), None, f"{RESOLVE}/one.png"),  # a widget that is one entry, not a list
    (_info([{"output": {"url": "../../other/repo/x.png"}}], ("z.png",)), None, f"{RESOLVE}/z.png"),
    (_info([{"output": {"url": "notes.txt"}}, {"output": None}], ("dev_grid.jpg", "a/b.png")), None,
     f"{RESOLVE}/dev_grid.jpg"),
    (_info(None, ("01.png", "comparison.png", "unet/x.png")), None, f"{RESOLVE}/01.png"),
    (_info(None, ("top.png", "vae/sample.png", "vae/deeper/x.png")), "vae", f"{RESOLVE}/vae/sample.png"),
    (_info(None, ("model.safetensors", "README.md")), None, None),
    ({"cardData": "not a card", "siblings": "nor a list"}, None, None),
])
def test_the_image_that_stands_for_a_repo(info: dict[str, Any], subfolder: str | None, expected: str | None) -> None:
    assert thumbnail_url(info, HFSource("acme/repo", subfolder), HUB, COMMIT) == expected
