"""Rules that identify a model folder from its layout and JSON configs (weights stay unread).

- ``model_index.json``: a diffusers pipeline (or an ONNX export of one); the UNet or transformer
  config gives base and variant, the scheduler config the prediction type.
- ``pytorch_lora_weights.*``, ``learned_embeds.*``, ``ip_adapter.*``: adapters saved by diffusers
  training scripts / InvokeAI; their one weights file is read by the file rules for the base.
- ``config.json``: a single diffusers model (``_class_name``) or transformers model
  (``architectures``): VAE, ControlNet, T2I-Adapter, CLIP Vision, T5 encoder, CLIP text encoder (also in
  InvokeAI's layout, ``text_encoder/`` beside ``tokenizer/``, as T5's ``text_encoder_2/``).
- ``*.onnx`` files: an ONNX pipeline, format ``olive`` when Olive left its traces (see
  :func:`onnx_format`), else ``onnx``.
- a ``quantization_config`` of bitsandbytes in the folder's or a submodel's ``config.json`` (as diffusers'
  and transformers' ``save_pretrained`` write it): the record's ``quantization`` is ``nf4``, ``fp4`` or
  ``int8``; the format stays the folder's (the folder loader keeps the weights quantized).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from modelbus.services.probe.dit import probe_dit
from modelbus.services.probe.errors import CorruptModelError, UnrecognizedFilesError
from modelbus.services.probe.families import (
    clip_embed_notes,
    lora_base,
    probe_ip_adapter,
    probe_textual_inversion,
    sd3_base,
)
from modelbus.services.probe.result import ProbeResult, compatible_bases, upcast_for
from modelbus.services.probe.tensors import TensorIndex, read_tensor_index
from modelbus.services.records.enums import BaseModelType as Base
from modelbus.services.records.enums import ModelFormat, ModelType, ModelVariantType, SchedulerPredictionType

_CONTEXT_DIMS = {768: Base.StableDiffusion1, 1024: Base.StableDiffusion2, 2048: Base.StableDiffusionXL,
                 1280: Base.StableDiffusionXLRefiner}  # fmt: skip
_VARIANTS = {4: ModelVariantType.Normal, 9: ModelVariantType.Inpaint, 5: ModelVariantType.Depth}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# AutoencoderKL.scaling_factor of the published VAEs (the latent spaces differ only in it)
_VAE_SCALING = {0.18215: Base.StableDiffusion1, 0.13025: Base.StableDiffusionXL,
                1.5305: Base.StableDiffusion3, 0.3611: Base.Flux}  # fmt: skip
_VAE_CLASSES = {"AutoencoderKLWan": Base.Wan21, "AutoencoderKLQwenImage": Base.QwenImage,
                "AutoencoderKLFlux2": Base.Flux2}  # fmt: skip
_OLIVE_NAME = re.compile(r"olive|footprints", re.IGNORECASE)
_OLIVE_EXTERNAL_DATA = ".onnx.data"  # Olive's <model>.onnx.data; diffusers writes weights.pb, Optimum model.onnx_data
_MAX_WORKFLOW_JSON = 1 << 20  # Olive workflow configs are a few KB; tokenizer vocabularies are not read


def bnb_folder_quantization(path: Path) -> str | None:
    """``nf4``/``fp4``/``int8`` when the folder or one of its submodels was saved quantized by bitsandbytes."""
    for config in [path / "config.json", *sorted(path.glob("*/config.json"))]:
        try:
            quant = orjson.loads(config.read_bytes()).get("quantization_config") if config.is_file() else None
        except (OSError, orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes":
            if quant.get("load_in_8bit"):
                return "int8"
            return str(quant.get("bnb_4bit_quant_type") or "fp4")  # (BitsAndBytesConfig's default is fp4)
    return None


def identify_folder(path: Path) -> ProbeResult:
    result = _identify_folder(path)
    quant = bnb_folder_quantization(path) if result.quantization is None else None
    return result.model_copy(update={"quantization": quant}) if quant else result


def _identify_folder(path: Path) -> ProbeResult:
    if (path / "model_index.json").is_file():
        return _probe_pipeline(path, read_json(path / "model_index.json"))
    weights = _first_existing(path, "pytorch_lora_weights")
    if weights is not None:
        return _result(ModelType.Lora, ModelFormat.Diffusers, lora_base(read_tensor_index(weights)))
    weights = _first_existing(path, "learned_embeds")
    if weights is not None:
        ti = probe_textual_inversion(read_tensor_index(weights))
        if ti is None:
            raise UnrecognizedFilesError(f"{weights}: named like an embedding but holds no embedding vectors")
        return _result(ModelType.TextualInversion, ModelFormat.EmbeddingFolder, ti.base_model)
    weights = _first_existing(path, "ip_adapter")
    if weights is not None:
        ip = probe_ip_adapter(read_tensor_index(weights))
        if ip is None:
            raise UnrecognizedFilesError(f"{weights}: named like an IP-Adapter but lacks image_proj/ip_adapter weights")
        return _result(ModelType.IPAdapter, ModelFormat.InvokeAI, ip.base_model)
    if (path / "config.json").is_file():
        return _probe_single_model(path, read_json(path / "config.json"))
    t5_config = path / "text_encoder_2" / "config.json"
    if t5_config.is_file() and "T5EncoderModel" in read_json(t5_config).get("architectures", []):
        return _result(ModelType.T5Encoder, ModelFormat.T5Encoder, Base.Any)
    clip_config = path / "text_encoder" / "config.json"
    if clip_config.is_file() and _is_clip_text(read_json(clip_config)):
        return _result(ModelType.CLIPEmbed, ModelFormat.Diffusers, Base.Any,
                       notes=clip_embed_notes(read_json(clip_config).get("hidden_size")))
    if _onnx_files(path):
        return _probe_onnx(path)
    raise UnrecognizedFilesError(f"{path}: folder is no known model layout: {_describe_folder(path)}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CorruptModelError(f"{path}: not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CorruptModelError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path}: expected a JSON object")
    return data


def _result(model_type: ModelType, fmt: ModelFormat, base: Base, **fields: Any) -> ProbeResult:
    return ProbeResult(model_type=model_type, model_format=fmt, base_model=base,
                       compatible_bases=compatible_bases(model_type, base), **fields)  # fmt: skip


def _probe_pipeline(path: Path, index: dict[str, Any]) -> ProbeResult:
    cls = str(index.get("_class_name", ""))
    if "onnx" in cls.lower() or cls.startswith("ORT") or _onnx_files(path):
        return _probe_onnx(path)
    dit = _probe_dit_pipeline(path, index)
    if dit is not None:
        return dit
    if cls.startswith("Flux"):
        transformer = _sub_config(path, "transformer")
        # FLUX Fill: image + mask + masked image; Canny/Depth: image + control latents
        variant = {384: ModelVariantType.Inpaint, 128: ModelVariantType.Control}.get(
            transformer.get("in_channels", 64), ModelVariantType.Normal)
        if variant is ModelVariantType.Normal and "Kontext" in cls:
            variant = ModelVariantType.Kontext
        return _result(ModelType.Main, ModelFormat.Diffusers, Base.Flux, variant=variant)
    if cls.startswith("StableDiffusion3"):
        transformer = _sub_config(path, "transformer")
        width = int(transformer.get("num_attention_heads", 24)) * int(transformer.get("attention_head_dim", 64))
        base = sd3_base(width, bool(transformer.get("dual_attention_layers")))
        return _result(ModelType.Main, ModelFormat.Diffusers, base, variant=ModelVariantType.Normal)
    unet = _sub_config(path, "unet")
    base = _context_base(path / "unet", unet.get("cross_attention_dim"))
    channels = unet.get("in_channels", 4)
    if channels not in _VARIANTS:
        raise UnrecognizedFilesError(f"{path}: UNet with {channels} input channels (known: 4, 5, 9)")
    prediction = _scheduler_prediction(path)
    upcast = unet.get("upcast_attention")
    return _result(
        ModelType.Main,
        ModelFormat.Diffusers,
        base,
        variant=_VARIANTS[channels],
        prediction_type=prediction,
        upcast_attention=bool(upcast) if upcast is not None else upcast_for(base, prediction),
    )


# transformer classes of the families the dit rules identify from their tensors
_DIT_CLASSES = frozenset({
    "ChromaTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
    "QwenImage21Transformer2DModel", "WanTransformer3DModel", "ZImageTransformer2DModel",
    "HiDreamImageTransformer2DModel", "Lumina2Transformer2DModel", "SanaTransformer2DModel",
    "LTXVideoTransformer3DModel", "LTX2VideoTransformer3DModel", "HunyuanVideoTransformer3DModel",
    "HunyuanVideo15Transformer3DModel",
})  # fmt: skip


def _probe_dit_pipeline(path: Path, index: dict[str, Any]) -> ProbeResult | None:
    """A pipeline of one of the 2025-2026 families: its transformer's config builds the model on the meta
    device, and the file rules read the names and shapes that gives (the same rules as for single
    files, so a size is told the same way). The pipeline class and a second expert (Wan 2.2's
    ``transformer_2``) stand in for the file name where shapes cannot tell."""
    config_path = path / "transformer" / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    cls_name = str(config.get("_class_name", ""))
    if cls_name not in _DIT_CLASSES:
        return None
    shapes = _meta_shapes(config_path, cls_name, config)
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", str(index.get("_class_name", ""))).lower()
    if "transformer_2" in index:  # Wan 2.2 A14B: a high-noise and a low-noise expert
        words += " wan2.2 a14b"
    elif cls_name == "WanTransformer3DModel":
        words += " wan2.1"
    try:
        result = probe_dit(TensorIndex(path, shapes, {"pipeline": words}))
    except UnrecognizedFilesError as exc:
        raise UnrecognizedFilesError(str(exc), {**exc.partial, "model_format": ModelFormat.Diffusers}) from exc
    if result is None:
        raise UnrecognizedFilesError(f"{config_path}: a {cls_name} whose weights match none of its family's rules")
    return result.model_copy(update={"model_format": ModelFormat.Diffusers})


def _meta_shapes(where: Path, cls_name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import warnings

    import diffusers
    import torch

    cls = getattr(diffusers, cls_name)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls.from_config(kwargs)
    except Exception as exc:  # a config diffusers cannot build: whatever it raises, the config is the fault
        raise CorruptModelError(f"{where}: {cls_name} config that diffusers cannot build: {exc}") from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _probe_onnx(path: Path) -> ProbeResult:
    unet_config = path / "unet" / "config.json"
    unet = read_json(unet_config) if unet_config.is_file() else {}
    dim = unet.get("cross_attention_dim")
    # ONNX exports were made of SD-1 and SD-2 pipelines; without a UNet config assume SD-1
    base = _context_base(path / "unet", dim) if dim is not None else Base.StableDiffusion1
    prediction = _scheduler_prediction(path)
    upcast = unet.get("upcast_attention")
    return _result(
        ModelType.ONNX,
        onnx_format(path),
        base,
        variant=ModelVariantType.Normal,
        prediction_type=prediction,
        upcast_attention=bool(upcast) if upcast is not None else upcast_for(base, prediction),
    )


def onnx_format(path: Path) -> ModelFormat:
    """``olive`` for an ONNX pipeline that Microsoft Olive produced, else ``onnx``.

    Olive writes an ordinary ONNX pipeline (the same ``model_index.json``, whether the class is
    diffusers' ``OnnxStableDiffusionPipeline`` or Optimum's ``ORTStableDiffusionPipeline``), so
    only what Olive leaves beside the models tells. In the folder or a component subfolder:

    - a file or folder named after Olive or its run records (``olive_config.json``,
      ``footprints.json``, ``olive-cache/``...);
    - an Olive workflow config: a JSON object with ``passes`` and ``input_model``;
    - external weights named ``<model>.onnx.data``, Olive's naming for models over 2 GB
      (diffusers' exporter writes ``weights.pb``, Optimum ``model.onnx_data``).

    Anything else is plain ``onnx``. The two load the same way; the format records provenance,
    and a user who knows better overrides it.
    """
    for entry in _entries(path, depth=2):
        if _OLIVE_NAME.search(entry.name) or entry.name.endswith(_OLIVE_EXTERNAL_DATA):
            return ModelFormat.Olive
        if entry.suffix == ".json" and _is_olive_workflow(entry):
            return ModelFormat.Olive
    return ModelFormat.Onnx


def _entries(path: Path, depth: int) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        found.append(entry)
        if depth > 1 and entry.is_dir():
            found.extend(_entries(entry, depth - 1))
    return found


def _is_olive_workflow(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > _MAX_WORKFLOW_JSON:
            return False
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False  # an unreadable side file does not make a model corrupt
    return isinstance(data, dict) and "passes" in data and "input_model" in data


def _probe_single_model(path: Path, config: dict[str, Any]) -> ProbeResult:
    cls = str(config.get("_class_name", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    if cls in ("AutoencoderKL", "AutoencoderTiny"):
        return _result(ModelType.Vae, ModelFormat.Diffusers, _vae_base(path, config))
    if cls in _VAE_CLASSES:  # the new families' VAEs: the class names the family (Wan's: its latent channels)
        base = Base.Wan22 if cls == "AutoencoderKLWan" and config.get("z_dim") == 48 else _VAE_CLASSES[cls]
        return _result(ModelType.Vae, ModelFormat.Diffusers, base)
    if cls == "ControlNetModel":
        base = _context_base(path, config.get("cross_attention_dim"))
        return _result(ModelType.ControlNet, ModelFormat.Diffusers, base)
    if cls in ("SD3ControlNetModel", "FluxControlNetModel"):
        base = Base.StableDiffusion3 if cls.startswith("SD3") else Base.Flux
        return _result(ModelType.ControlNet, ModelFormat.Diffusers, base)
    if cls == "T2IAdapter":
        xl = config.get("adapter_type") == "full_adapter_xl"
        base = Base.StableDiffusionXL if xl else Base.StableDiffusion1
        return _result(ModelType.T2IAdapter, ModelFormat.Diffusers, base)
    if any(a.startswith("Siglip") for a in architectures):
        return _result(ModelType.SigLIP, ModelFormat.Diffusers, Base.Any)
    if any(a.startswith("Llava") for a in architectures):
        return _result(ModelType.LlavaOnevision, ModelFormat.Diffusers, Base.Any)
    if any(a.startswith("CLIPVisionModel") for a in architectures):
        return _result(ModelType.CLIPVision, ModelFormat.Diffusers, Base.Any)
    if "T5EncoderModel" in architectures:
        return _result(ModelType.T5Encoder, ModelFormat.T5Encoder, Base.Any)
    if _is_clip_text(config):
        return _result(ModelType.CLIPEmbed, ModelFormat.Diffusers, Base.Any, notes=clip_embed_notes(config.get("hidden_size")))
    if "UMT5EncoderModel" in architectures:
        return _result(ModelType.T5Encoder, ModelFormat.T5Encoder, Base.Wan21, notes="UMT5 encoder (Wan's text encoder)")
    if any(a.startswith("Qwen2_5_VL") for a in architectures):
        text_config = config.get("text_config")
        text = text_config if isinstance(text_config, dict) else config
        width = text.get("hidden_size") or config.get("hidden_size")
        base = Base.QwenImage if width == 3584 else Base.Any
        return _result(ModelType.Qwen25VL, ModelFormat.Diffusers, base,
                       notes=None if base is Base.QwenImage else f"Qwen2.5-VL of width {width}")
    if any(a.startswith("Qwen3") and not a.startswith("Qwen3Moe") for a in architectures):
        width = config.get("hidden_size")
        base = {2560: Base.ZImage, 4096: Base.Flux2}.get(width if isinstance(width, int) else 0, Base.Any)
        return _result(ModelType.Qwen3Encoder, ModelFormat.Diffusers, base,
                       notes=None if base is not Base.Any else f"Qwen3 language model of width {width}")
    if any(a.startswith(("Mistral3", "MistralForCausalLM", "MistralModel")) for a in architectures):
        text_config = config.get("text_config")
        text = text_config if isinstance(text_config, dict) else config
        shape = (text.get("hidden_size"), text.get("intermediate_size"), text.get("vocab_size"))
        small = shape == (5120, 32768, 131072)
        return _result(ModelType.MistralEncoder, ModelFormat.Diffusers, Base.Flux2 if small else Base.Any,
                       notes=None if small else f"Mistral language model of width {shape[0]}, MLP {shape[1]}, "
                       f"vocabulary {shape[2]} (FLUX.2 dev reads Mistral Small 3.x)")
    seen = cls or (", ".join(architectures) if architectures else "no _class_name or architectures")
    raise UnrecognizedFilesError(f"{path}: config.json describes an unsupported model ({seen}); {_describe_folder(path)}")


#: the transformers classes of a CLIP text encoder alone (a whole CLIPModel has an image tower: not one)
_CLIP_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _is_clip_text(config: dict[str, Any]) -> bool:
    return any(str(a) in _CLIP_TEXT_CLASSES for a in config.get("architectures") or [])


def _vae_base(path: Path, config: dict[str, Any]) -> Base:
    scaling = config.get("scaling_factor")
    for known, base in _VAE_SCALING.items():
        if isinstance(scaling, (int, float)) and abs(scaling - known) < 1e-4:
            return base
    latent = config.get("latent_channels", 4)
    if latent == 16:
        return Base.Flux
    if latent == 4:
        return Base.StableDiffusionXL if "xl" in path.name.lower() else Base.StableDiffusion1
    raise UnrecognizedFilesError(f"{path}: VAE with {latent} latent channels and scaling factor {scaling}")


def _context_base(where: Path, dim: Any) -> Base:
    if isinstance(dim, list) and dim:
        dim = dim[0]
    if dim in _CONTEXT_DIMS:
        return _CONTEXT_DIMS[dim]
    raise UnrecognizedFilesError(
        f"{where}: cross_attention_dim {dim!r} matches no known base "
        "(768 sd-1, 1024 sd-2, 1280 sdxl-refiner, 2048 sdxl); pass base_model explicitly"
    )


def _scheduler_prediction(path: Path) -> SchedulerPredictionType:
    config_path = path / "scheduler" / "scheduler_config.json"
    value = read_json(config_path).get("prediction_type") if config_path.is_file() else None
    try:
        return SchedulerPredictionType(value or "epsilon")
    except ValueError as exc:
        raise UnrecognizedFilesError(f"{config_path}: unknown prediction_type {value!r}") from exc


def _sub_config(path: Path, sub: str) -> dict[str, Any]:
    config_path = path / sub / "config.json"
    if not config_path.is_file():
        raise UnrecognizedFilesError(f"{path}: diffusers pipeline without {sub}/config.json; {_describe_folder(path)}")
    return read_json(config_path)


def _first_existing(path: Path, stem: str) -> Path | None:
    for suffix in _WEIGHT_SUFFIXES:
        candidate = path / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _onnx_files(path: Path) -> list[Path]:
    return [*path.glob("*.onnx"), *path.glob("*/*.onnx")]


def _describe_folder(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"folder with {len(entries)} entries ({shown or 'empty'})"
