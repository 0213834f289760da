"""What a file's metadata says it is, to compare with what its tensors say (the tensors win).

Trainers and converters write the family into safetensors metadata: ModelSpec's
``modelspec.architecture`` (``stable-diffusion-xl-v1-base``, ``flux-1-dev/lora``...) and kohya's
``ss_base_model_version`` (``sdxl_base_v1-0``, ``sd3``, ``flux1``...). A file re-saved under another
family's name, or a merge that kept a parent's metadata, claims a base its tensors deny: identification
keeps the tensors' answer and records the disagreement in the record's ``notes``.
"""

from __future__ import annotations

import re

from modelbus.services.probe.result import ProbeResult
from modelbus.services.probe.tensors import TensorIndex
from modelbus.services.records.enums import BaseModelType as Base

CLAIM_KEYS = ("modelspec.architecture", "ss_base_model_version")
# first match wins: the more specific spellings come first
_CLAIMS: tuple[tuple[str, Base], ...] = (
    (r"flux[-_. ]?(?:\.)?2", Base.Flux2),
    (r"chroma", Base.Chroma),
    (r"kontext|flux", Base.Flux),
    (r"(?:v3\.5|3\.5|35)[-_ ]?l(?:arge)?\b|sd3\.5[-_ ]?large", Base.StableDiffusion35Large),
    (r"v3\.5|sd3\.5|sd35|3\.5[-_ ]?m", Base.StableDiffusion35Medium),
    (r"v3\b|v3[-_]|sd3|sd-3", Base.StableDiffusion3),
    (r"xl.*refiner|refiner", Base.StableDiffusionXLRefiner),
    (r"xl", Base.StableDiffusionXL),
    (r"v2|sd_?2", Base.StableDiffusion2),
    (r"v1|sd_?1", Base.StableDiffusion1),
    (r"qwen[-_ ]?image[-_ ]?2\.1", Base.QwenImage21),
    (r"qwen", Base.QwenImage),
    (r"wan[-_ ]?2\.?2", Base.Wan22),
    (r"wan", Base.Wan21),
    (r"z[-_ ]?image", Base.ZImage),
    (r"hidream", Base.HiDream),
    (r"lumina", Base.Lumina2),
    (r"sana", Base.Sana),
    (r"ltx[-_ ]?2|ltxv?2", Base.LTXVideo2),
    (r"ltx", Base.LTXVideo),
    (r"hunyuan[-_ ]?video[-_ ]?1\.5", Base.HunyuanVideo15),
    (r"hunyuan", Base.HunyuanVideo),
)


def claimed_base(index: TensorIndex) -> tuple[str, str, Base] | None:
    """(metadata key, its value, the base it names) of the first claim the metadata makes."""
    for key in CLAIM_KEYS:
        value = index.metadata.get(key)
        if not value:
            continue
        text = value.lower()
        for pattern, base in _CLAIMS:
            if re.search(pattern, text):
                return key, value, base
    return None


def with_claim_checked(index: TensorIndex, result: ProbeResult) -> ProbeResult:
    """``result`` with a note when the metadata claims a base the tensors do not show."""
    claim = claimed_base(index)
    if claim is None:
        return result
    key, value, base = claim
    if base == result.base_model or base in result.compatible_bases or result.base_model is Base.Any:
        return result
    note = (f"metadata {key}={value!r} claims {base.value}, but the tensors are {result.base_model.value}'s: "
            "identified by the tensors")
    notes = f"{result.notes}; {note}" if result.notes else note
    return result.model_copy(update={"notes": notes})
