"""Companion models: the parts of a converted pipeline that its single file does not hold.

A FLUX.1 file holds its transformer alone; an SD-3 / SD-3.5 file may lack its VAE, CLIP-L, CLIP-G and T5-XXL;
and no single file carries T5's tokenizer (nor does the project ship one: its SentencePiece model is not ours to
make). A converted folder must be complete for diffusers to load, so each part the file lacks comes from an
installed companion model: a record of the type and base :data:`COMPANIONS` lists for that part, in order of
preference (other than the model being converted), built by the load service's own loader for that record
(``services.load.registry``: a VAE file, a T5 encoder file or folder, a part of another main model, diffusers or
single file) and written like the file's own parts. The CLIP tokenizers and FLUX's schedulers are the project's
shipped configs. FLUX.1's CLIP-L is OpenAI's CLIP ViT-L/14 text model, frozen: a CLIP text encoder file
(``clip_embed``: comfyanonymous' ``clip_l.safetensors``, the ``clip-l-encoder`` starter, or a transformers
folder) gives it first; the same
weights SD-1.x and SDXL's first text encoder carry, so those models are companions too. T5's tokenizer comes from
a T5 encoder folder that holds it (the ``t5-xxl-encoder`` starter is InvokeAI's ``text_encoder_2/`` +
``tokenizer_2/`` folder), or from a FLUX or SD-3 diffusers model.

The candidates of every missing part are found before anything is built: a part no installed model can give
refuses the conversion (:class:`MissingCompanionError`) naming each such part and what would give it, and
nothing is written or recorded. A candidate that does not load is passed over for the next, and so is a CLIP
text encoder of the wrong width (:func:`clip_width_wanted`: a CLIP-G recorded as ``clip_embed`` is no FLUX
CLIP-L), its width and the one wanted named in the refusal when no candidate fits.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from modelbus.events.errors import ModelbusError
from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.convert import NotConvertible
from modelbus.services.load.kit import VAE_PREFIXES, LoadRequest, fit_keys
from modelbus.services.load.registry import loader_for
from modelbus.services.load.sd3 import SD3_CLIP_PREFIXES, SD3_T5_PREFIX
from modelbus.services.probe import read_tensor_index
from modelbus.services.probe.families import CLIP_EMBED_PREFIXES
from modelbus.services.records import SubModelType

log = get_logger(__name__)

_SD3 = ("sd-3", "sd-3.5-medium", "sd-3.5-large")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


class MissingCompanionError(NotConvertible):
    """A part the file lacks that no installed model can give: the conversion is refused, nothing changes."""


@dataclass(frozen=True)
class Source:
    """Records of ``model_type`` (and of one of ``bases``; empty: any base) give a part: the record itself
    (``submodel`` None), one of its submodels, or (``tokenizer_of``) the tokenizer its folder holds."""

    model_type: str
    bases: tuple[str, ...]
    submodel: str | None = None
    tokenizer_of: bool = False


_T5_FOLDER_TOKENIZER = Source("t5_encoder", ("any",), tokenizer_of=True)
#: (pipeline, part) -> where the part may come from, the best first
COMPANIONS: dict[tuple[str, str], tuple[Source, ...]] = {
    ("FluxPipeline", "vae"): (Source("vae", ("flux",)), Source("main", ("flux",), "vae")),
    ("FluxPipeline", "text_encoder"): (Source("clip_embed", ("any",)), Source("main", ("flux",), "text_encoder"),
                                       Source("main", ("sdxl",), "text_encoder"),
                                       Source("main", ("sd-1",), "text_encoder")),
    ("FluxPipeline", "text_encoder_2"): (Source("t5_encoder", ("any",)), Source("main", ("flux",), "text_encoder_2"),
                                         Source("main", _SD3, "text_encoder_3")),
    ("FluxPipeline", "tokenizer_2"): (_T5_FOLDER_TOKENIZER, Source("main", ("flux",), "tokenizer_2"),
                                      Source("main", _SD3, "tokenizer_3")),
    ("StableDiffusion3Pipeline", "vae"): (Source("vae", _SD3), Source("main", _SD3, "vae")),
    ("StableDiffusion3Pipeline", "text_encoder"): (Source("clip_embed", ("any",)), Source("main", _SD3, "text_encoder")),
    ("StableDiffusion3Pipeline", "text_encoder_2"): (Source("main", _SD3, "text_encoder_2"),),
    ("StableDiffusion3Pipeline", "text_encoder_3"): (Source("t5_encoder", ("any",)),
                                                     Source("main", _SD3, "text_encoder_3"),
                                                     Source("main", ("flux",), "text_encoder_2")),
    ("StableDiffusion3Pipeline", "tokenizer_3"): (_T5_FOLDER_TOKENIZER, Source("main", _SD3, "tokenizer_3"),
                                                  Source("main", ("flux",), "tokenizer_2")),
}
#: what to install when a part has no companion
_T5_TOKENIZER = ("a T5 tokenizer: a T5 encoder folder holding its tokenizer files (modelbus install --starter "
                 "t5-xxl-encoder: text_encoder_2/ and tokenizer_2/), or a FLUX or SD-3 diffusers model")
WANTED = {"vae": "a VAE of the family (FLUX.1: ae.safetensors, modelbus install --starter flux-vae)",
          "text_encoder": "a CLIP-L text encoder (modelbus install --starter clip-l-encoder; for FLUX.1 also any "
                          "SD-1, SDXL or FLUX diffusers main model carries it)",
          "text_encoder_2": "a T5-XXL encoder (modelbus install --starter t5-xxl-encoder)",
          "text_encoder_3": "a T5-XXL encoder (modelbus install --starter t5-xxl-encoder)",
          "tokenizer_2": _T5_TOKENIZER, "tokenizer_3": _T5_TOKENIZER}
#: (pipeline, part) -> the class the pipeline takes, when another one's weights may be given for it
_AS_CLASS: dict[tuple[str, str], type] = {("FluxPipeline", "text_encoder"): CLIPTextModel,
                                          ("StableDiffusion3Pipeline", "text_encoder"): CLIPTextModelWithProjection}

Candidate = tuple[Any, Source]


def _value(field: Any) -> str:
    return str(getattr(field, "value", field))


#: the parts an SD-3 file may bundle, by the tensor names that show them
SD3_BUNDLED: dict[str, tuple[str, ...]] = {
    "vae": VAE_PREFIXES,
    "text_encoder": (SD3_CLIP_PREFIXES[SubModelType.TextEncoder],),
    "text_encoder_2": (SD3_CLIP_PREFIXES[SubModelType.TextEncoder2],),
    "text_encoder_3": (SD3_T5_PREFIX,),
}


def bundled_parts(path: Path) -> set[str]:
    """What an SD-3 file bundles beside its transformer (its header alone is read)."""
    try:
        names = list(read_tensor_index(path).shapes)
    except ModelbusError as exc:
        raise NotConvertible(f"{path}: cannot read its tensors: {exc}") from exc
    return {part for part, prefixes in SD3_BUNDLED.items() if any(n.startswith(prefixes) for n in names)}


def _gives(config: AppConfig, record: Any, source: Source) -> bool:
    """Whether ``record`` can give what ``source`` names: a T5 folder its tokenizer only when it holds its files,
    no single file holds a tokenizer (beyond the shipped CLIP ones), a FLUX.1 file holds its transformer alone,
    an SD-3 file what it bundles."""
    if source.tokenizer_of and _value(record.model_format) != "checkpoint":
        try:  # a T5 folder without its tokenizer (a weights-only repo) gives none: refused at the plan, by name
            return bool(_tokenizer_folder(config.model_path(record.path)))
        except NotConvertible:
            return False
    if _value(record.model_format) != "checkpoint":
        return True
    if source.tokenizer_of or (source.submodel or "").startswith("tokenizer"):
        return False
    if source.model_type == "main" and _value(record.base_model) == "flux":
        return False
    if source.model_type == "main" and _value(record.base_model) in _SD3:
        try:
            return str(source.submodel) in bundled_parts(config.model_path(record.path))
        except NotConvertible:
            return False
    return True


def candidates(config: AppConfig, records: Iterable[Any], key: str, pipeline: str, part: str) -> list[Candidate]:
    """The records that may give ``part``, the best first (by source, then name and key)."""
    models = sorted((r for r in records if r.key != key), key=lambda r: (r.name, r.key))
    out: list[Candidate] = []
    for source in COMPANIONS.get((pipeline, part), ()):
        out += [(r, source) for r in models if _value(r.model_type) == source.model_type
                and (not source.bases or _value(r.base_model) in source.bases) and _gives(config, r, source)]
    return out


def plan_companions(config: AppConfig, records: Iterable[Any], model: Any, pipeline: str,
                    parts: list[str]) -> dict[str, list[Candidate]]:
    """part -> its candidates, for every one of ``parts``; MissingCompanionError naming each part none gives."""
    listed = list(records)
    found = {part: candidates(config, listed, model.key, pipeline, part) for part in parts}
    missing = [part for part, got in found.items() if not got]
    if missing:
        wanted = "; ".join(f"for {part}, {WANTED.get(part, 'a model of the family')}" for part in missing)
        raise MissingCompanionError(
            f"model {model.key} ({_value(model.base_model)}) converts to a complete diffusers folder only with companion "
            f"models for what its file lacks, and none is installed for {', '.join(missing)} (install {wanted})")
    return found


def clip_width(model: Any) -> int:
    """How wide a CLIP text encoder's pooled output is: its projection's (CLIPTextModelWithProjection's
    ``text_embeds``, what SD-3 pools), else its hidden size (CLIPTextModel's ``pooler_output``, what FLUX pools)."""
    projection = getattr(model, "text_projection", None)
    if projection is not None:
        return int(projection.weight.shape[0])
    return int(model.config.hidden_size)


def clip_width_wanted(pipeline: str, part: str, built: dict[str, Any]) -> tuple[int, str] | None:
    """(the width the pipeline's CLIP ``part`` must have, why), from the config of the transformer the file
    gave, so a tiny pipeline wants a tiny width; None where that does not say (not a CLIP part, or SD-3's
    first CLIP companion while the other is not built either). FLUX.1 pools CLIP-L alone: its transformer's
    ``pooled_projection_dim`` (768). SD-3 pools CLIP-L and CLIP-G side by side: the two widths add up to its
    ``pooled_projection_dim`` (768 + 1280 = 2048), so one is that less the other's."""
    transformer = built.get("transformer")
    pooled = getattr(getattr(transformer, "config", None), "pooled_projection_dim", None)
    if not isinstance(pooled, int):
        return None
    if pipeline == "FluxPipeline" and part == "text_encoder":
        return pooled, f"its transformer's pooled_projection_dim is {pooled}"
    other = {"text_encoder": "text_encoder_2", "text_encoder_2": "text_encoder"}.get(part)
    if pipeline == "StableDiffusion3Pipeline" and other is not None and other in built:
        width = clip_width(built[other])
        return pooled - width, f"its transformer's pooled_projection_dim is {pooled} and its {other} is {width} wide"
    return None


def companion_order(parts: Iterable[str]) -> list[str]:
    """The order companions are built in: SD-3's CLIP-G before CLIP-L, so one's width tells the other's."""
    listed = list(parts)
    if "text_encoder" in listed and "text_encoder_2" in listed:
        listed.remove("text_encoder_2")
        listed.insert(listed.index("text_encoder"), "text_encoder_2")
    return listed


def build_companion(config: AppConfig, pipeline: str, part: str, found: list[Candidate],
                    dtype: torch.dtype, built_parts: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(the part, the record that gave it), from the first candidate that gives it (a CLIP text encoder only
    of the width the pipeline's other parts in ``built_parts`` want); NotConvertible naming what each one
    answered."""
    errors = []
    width_wanted = clip_width_wanted(pipeline, part, built_parts or {})

    def check_width(width: int | None) -> None:
        if width_wanted is not None and width is not None and width != width_wanted[0]:
            raise NotConvertible(f"a CLIP text encoder {width} wide, and {pipeline}'s {part} must be "
                                 f"{width_wanted[0]} wide ({width_wanted[1]})")
    for record, source in found:
        try:
            if width_wanted is not None and source.model_type == "clip_embed":
                check_width(declared_clip_width(config, record, pipeline))  # a wrong one is not even built
            built = _build(config, record, source, dtype)
            wanted = _AS_CLASS.get((pipeline, part))
            if wanted is not None and type(built) is not wanted:
                built = _as_class(built, wanted)
            if width_wanted is not None:
                check_width(clip_width(built))
        except (ModelbusError, OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            errors.append(f"{record.key} ({record.name}): {exc}")
            log.info("companion_passed_over", part=part, key=record.key, error=str(exc))
            continue
        log.info("companion_used", part=part, key=record.key, name=record.name)
        return built, record
    raise NotConvertible(f"no installed companion gives {part}: " + "; ".join(errors)[:2000])


def declared_clip_width(config: AppConfig, record: Any, pipeline: str) -> int | None:
    """The width a ``clip_embed`` record's encoder has as ``pipeline`` takes it (FLUX.1: its hidden size; SD-3:
    its projection's, else its hidden size), from the file's header or the folder's ``config.json`` alone;
    None when they do not say (the built encoder is checked then)."""
    location = config.model_path(record.path)
    try:
        if _value(record.model_format) == "checkpoint":
            shapes = read_tensor_index(location).shapes
            prefix = next((p for p in CLIP_EMBED_PREFIXES
                           if f"{p}text_model.embeddings.token_embedding.weight" in shapes), None)
            if prefix is None:
                return None
            hidden: Any = shapes[f"{prefix}text_model.embeddings.token_embedding.weight"][-1]
            projection = shapes.get(f"{prefix}text_projection.weight")
            projected: Any = projection[0] if projection else None
        else:
            folder = location if (location / "config.json").is_file() else location / "text_encoder"
            text = json.loads((folder / "config.json").read_text())
            hidden = text.get("hidden_size")
            projected = text.get("projection_dim") if "CLIPTextModelWithProjection" in (
                text.get("architectures") or []) else None
    except (ModelbusError, OSError, ValueError, IndexError):
        return None
    width = hidden if pipeline == "FluxPipeline" else (projected or hidden)
    return width if isinstance(width, int) else None


def _build(config: AppConfig, record: Any, source: Source, dtype: torch.dtype) -> Any:
    location = config.model_path(record.path)
    if source.tokenizer_of:
        return AutoTokenizer.from_pretrained(_tokenizer_folder(location), local_files_only=True)
    submodel = SubModelType(source.submodel) if source.submodel else None
    load = loader_for(_value(record.model_type), _value(record.model_format))
    return load(LoadRequest(record, location, submodel, torch.device("cpu"), dtype)).model


def _tokenizer_folder(location: Path) -> Path:
    for folder in (location, location / "tokenizer_2", location / "tokenizer_3", location / "tokenizer"):
        if folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    raise NotConvertible(f"{location} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def _as_class(model: Any, cls: type) -> Any:
    """CLIP-L's text model as ``cls``: an SD-3 model's carries a projection FLUX does not take; SD-3 pools
    through one, the identity where a file has none (as SD-3's reference code and the SD-3 loader start it)."""
    if not isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        raise NotConvertible(f"a {type(model).__name__} is not a CLIP text encoder")
    dtype = next(model.parameters()).dtype
    if cls is CLIPTextModelWithProjection:
        hidden = model.config.hidden_size
        config = copy.deepcopy(model.config)
        config.projection_dim = hidden
        projected: Any = CLIPTextModelWithProjection(config)
        projected.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in model.state_dict().items()})
        projected.text_projection.weight.data = torch.eye(hidden)
        return projected.to(dtype)
    plain = cls(model.config)
    plain.load_state_dict(fit_keys(plain, {k: v for k, v in model.state_dict().items()
                                           if not k.startswith("text_projection.")}))
    return plain.to(dtype)
