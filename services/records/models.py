"""Model config records: ``ModelConfigBase`` and its subclasses, one per (model_type, model_format).

The concrete class of a record is chosen by the pair (``model_type``, ``model_format``), the spec's
discriminated union. ``AnyModelConfig`` is that union as a pydantic type; :mod:`.parsing` turns raw
dicts into configs with errors that name each bad field.

Beyond the spec: ``compatible_bases`` lists further bases a model serves besides ``base_model`` (an
SD-1 VAE also works with SD-2), and searches by base honour it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from modelbus.services.records.enums import (
    BaseModelType,
    ModelFormat,
    ModelType,
    ModelVariantType,
    SchedulerPredictionType,
)
from modelbus.services.records.extras import Cover, DefaultSettings, ModelLink

_BASE_ORDER = {b: i for i, b in enumerate(BaseModelType)}  # enum order, without iterating the enum per record


class ModelConfigBase(BaseModel):
    """The fields every model record has (the spec's table)."""

    # extra="forbid": a misspelt field is an error, not silently dropped data
    # defer_build: each record class builds its validator when it first validates (a CLI listing LoRAs
    # builds the LoRA classes only, not the forty others)
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True, defer_build=True)

    key: str = Field(min_length=1, description="unique identifier (imohash of the files, 32 hex chars)")
    name: str = Field(min_length=1, description="name of the model (not unique)")
    model_type: ModelType
    model_format: ModelFormat
    base_model: BaseModelType
    path: str = Field(min_length=1, description="location on disk; relative paths are under models_dir")
    hash: str = Field(min_length=1, description="most recent hash of the contents; starts out as the key")
    description: str | None = None
    author: str | None = None
    license: str | None = None
    source: str | None = None
    thumbnail_url: str | None = None
    tags: list[str] = Field(default_factory=list)
    trained_words: list[str] = Field(default_factory=list, description="trigger words, as reported by the source")
    compatible_bases: list[BaseModelType] = Field(
        default_factory=list, description="bases this model serves besides base_model")
    # per-model data the user edits, each by its own event (services.records.extras)
    default_settings: DefaultSettings | None = None
    trigger_phrases: list[str] = Field(default_factory=list, description="phrases a prompt uses to invoke it")
    links: list[ModelLink] = Field(default_factory=list, description="models this one is related to")
    cover: Cover | None = None
    quantization: str | None = Field(default=None, description="quantization of the weights (GGUF Q4_K, nf4, int8)")
    precision: str | None = Field(default=None, description="dtype the file stores (bf16, fp8_e4m3fn...)")
    notes: str | None = Field(default=None, description="what identification noticed (metadata that disagreed)")

    @model_validator(mode="before")
    @classmethod
    def _hash_defaults_to_key(cls, data: Any) -> Any:
        # the spec: "hash starts out being the same as key"
        if isinstance(data, dict) and data.get("hash") is None and data.get("key"):
            data = {**data, "hash": data["key"]}
        return data

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[str]) -> list[str]:
        # keep the caller's order, drop repeats: tags are a set with a stable presentation
        return list(dict.fromkeys(t.strip() for t in tags if t.strip()))

    @model_validator(mode="after")
    def _normalise_bases(self) -> ModelConfigBase:
        # the primary base is implied; keep the list free of it and of repeats, in enum order
        if not self.compatible_bases:
            return self  # the usual case, and nothing to normalise
        bases = {b for b in self.compatible_bases if b != self.base_model}
        ordered = sorted(bases, key=_BASE_ORDER.__getitem__)
        if ordered != self.compatible_bases:
            object.__setattr__(self, "compatible_bases", ordered)
        return self

    @property
    def bases(self) -> list[BaseModelType]:
        """The primary base followed by the compatible ones."""
        return [self.base_model, *self.compatible_bases]

    def serves(self, base: BaseModelType) -> bool:
        return base == self.base_model or base in self.compatible_bases


# --- mixins (the spec's intermediate classes) ---------------------------------------------------

class CheckpointConfig(ModelConfigBase):
    """A single-file model; ``config`` is its legacy config file (relative to the root)."""

    config: str | None = None


class DiffusersConfig(ModelConfigBase):
    """A diffusers folder."""


class MainConfig(ModelConfigBase):
    """A main (pipeline) model."""

    vae: str | None = None
    variant: ModelVariantType = ModelVariantType.Normal


# --- concrete classes: one per (model_type, model_format) ---------------------------------------

class MainCheckpointConfig(CheckpointConfig, MainConfig):
    model_type: Literal[ModelType.Main] = ModelType.Main
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class MainDiffusersConfig(DiffusersConfig, MainConfig):
    model_type: Literal[ModelType.Main] = ModelType.Main
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class ONNXSD2Config(MainConfig):
    """ONNX/Olive pipelines (the spec's ONNXSD2Config; SD-1 ones simply keep the defaults)."""

    model_type: Literal[ModelType.ONNX] = ModelType.ONNX
    model_format: Literal[ModelFormat.Onnx, ModelFormat.Olive]
    prediction_type: SchedulerPredictionType = SchedulerPredictionType.Epsilon
    upcast_attention: bool = False


class VaeCheckpointConfig(CheckpointConfig):
    model_type: Literal[ModelType.Vae] = ModelType.Vae
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class VaeDiffusersConfig(DiffusersConfig):
    model_type: Literal[ModelType.Vae] = ModelType.Vae
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class LoRAConfig(ModelConfigBase):
    """The spec's ``LoRAConfig``: the common base of every LoRA record, whatever its format, so
    ``isinstance(cfg, LoRAConfig)`` tells a LoRA. Records are always one of its two subclasses."""

    model_type: Literal[ModelType.Lora] = ModelType.Lora
    model_format: Literal[ModelFormat.Lycoris, ModelFormat.Diffusers]


class LoRALycorisConfig(LoRAConfig):
    model_type: Literal[ModelType.Lora] = ModelType.Lora
    model_format: Literal[ModelFormat.Lycoris] = ModelFormat.Lycoris


class LoRADiffusersConfig(DiffusersConfig, LoRAConfig):
    model_type: Literal[ModelType.Lora] = ModelType.Lora
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class TextualInversionFileConfig(ModelConfigBase):
    model_type: Literal[ModelType.TextualInversion] = ModelType.TextualInversion
    model_format: Literal[ModelFormat.EmbeddingFile] = ModelFormat.EmbeddingFile


class TextualInversionFolderConfig(ModelConfigBase):
    model_type: Literal[ModelType.TextualInversion] = ModelType.TextualInversion
    model_format: Literal[ModelFormat.EmbeddingFolder] = ModelFormat.EmbeddingFolder


class ControlNetCheckpointConfig(CheckpointConfig):
    model_type: Literal[ModelType.ControlNet] = ModelType.ControlNet
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class ControlNetDiffusersConfig(DiffusersConfig):
    model_type: Literal[ModelType.ControlNet] = ModelType.ControlNet
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class IPAdapterConfig(ModelConfigBase):
    """The spec's ``IPAdapterConfig``: an IP-Adapter in InvokeAI's folder layout (image encoder
    referenced separately), and the base of the single-file form, so ``isinstance(cfg, IPAdapterConfig)``
    tells every IP-Adapter record."""

    model_type: Literal[ModelType.IPAdapter] = ModelType.IPAdapter
    model_format: Literal[ModelFormat.InvokeAI] = ModelFormat.InvokeAI
    image_encoder_model_id: str | None = None


class IPAdapterCheckpointConfig(CheckpointConfig, IPAdapterConfig):
    model_type: Literal[ModelType.IPAdapter] = ModelType.IPAdapter
    # a narrower Literal than the folder form's: a subclass by design (isinstance tells every IP-Adapter)
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint  # type: ignore[assignment]


class CLIPVisionDiffusersConfig(DiffusersConfig):
    model_type: Literal[ModelType.CLIPVision] = ModelType.CLIPVision
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class T2IAdapterConfig(DiffusersConfig):
    model_type: Literal[ModelType.T2IAdapter] = ModelType.T2IAdapter
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class CLIPVisionCheckpointConfig(CheckpointConfig):
    model_type: Literal[ModelType.CLIPVision] = ModelType.CLIPVision
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class T2IAdapterCheckpointConfig(CheckpointConfig):
    """A single-file T2I-Adapter (diffusers state dict or TencentARC's original naming)."""

    model_type: Literal[ModelType.T2IAdapter] = ModelType.T2IAdapter
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class CLIPEmbedCheckpointConfig(CheckpointConfig):
    """A CLIP text encoder as one file (comfyanonymous' ``clip_l.safetensors``: ``text_model.*``, or SD's
    ``transformer.text_model.*``): FLUX.1's and SD-3's CLIP-L apart from any pipeline."""

    model_type: Literal[ModelType.CLIPEmbed] = ModelType.CLIPEmbed
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class CLIPEmbedDiffusersConfig(DiffusersConfig):
    """A CLIP text encoder as a transformers folder (``config.json`` naming ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``), alone or in InvokeAI's layout: ``text_encoder/`` beside ``tokenizer/``."""

    model_type: Literal[ModelType.CLIPEmbed] = ModelType.CLIPEmbed
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class T5EncoderConfig(ModelConfigBase):
    model_type: Literal[ModelType.T5Encoder] = ModelType.T5Encoder
    model_format: Literal[ModelFormat.T5Encoder] = ModelFormat.T5Encoder


class T5EncoderCheckpointConfig(CheckpointConfig):
    """A T5 encoder as one safetensors file (e.g. FLUX's t5xxl_fp16.safetensors)."""

    model_type: Literal[ModelType.T5Encoder] = ModelType.T5Encoder
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


# --- the 2025-2026 families and quantized formats (appended: see CONCRETE_CONFIGS) ----------------

class MainGGUFConfig(CheckpointConfig, MainConfig):
    """A transformer quantized as GGUF (Q8_0, Q4_K...); ``quantization`` names the dominant type."""

    model_type: Literal[ModelType.Main] = ModelType.Main
    model_format: Literal[ModelFormat.GGUF] = ModelFormat.GGUF


class MainBnbQuantizedConfig(CheckpointConfig, MainConfig):
    """A bitsandbytes-quantized checkpoint (NF4/FP4 or int8): loaded kept quantized where bitsandbytes runs
    (CUDA, and its CPU backend)."""

    model_type: Literal[ModelType.Main] = ModelType.Main
    model_format: Literal[ModelFormat.BnbQuantizedNF4, ModelFormat.BnbQuantizedInt8]


class FluxReduxConfig(CheckpointConfig):
    """FLUX.1 Redux: projects SigLIP image features into FLUX's text-token space."""

    model_type: Literal[ModelType.FluxRedux] = ModelType.FluxRedux
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint


class SpandrelImageToImageConfig(CheckpointConfig):
    """An image-to-image network Spandrel recognises (ESRGAN, SwinIR, DAT, HAT...): upscalers mostly."""

    model_type: Literal[ModelType.SpandrelImageToImage] = ModelType.SpandrelImageToImage
    model_format: Literal[ModelFormat.Checkpoint] = ModelFormat.Checkpoint
    architecture: str | None = Field(default=None, description="Spandrel's id of the architecture (ESRGAN, SwinIR...)")
    scale: int | None = Field(default=None, description="how many times larger the output is (1: restoration)")


class SigLIPConfig(ModelConfigBase):
    """A SigLIP vision encoder (folder or single file)."""

    model_type: Literal[ModelType.SigLIP] = ModelType.SigLIP
    model_format: Literal[ModelFormat.Diffusers, ModelFormat.Checkpoint]


class LlavaOnevisionConfig(ModelConfigBase):
    """A LLaVA-style vision-language model (transformers folder)."""

    model_type: Literal[ModelType.LlavaOnevision] = ModelType.LlavaOnevision
    model_format: Literal[ModelFormat.Diffusers] = ModelFormat.Diffusers


class Qwen25VLConfig(ModelConfigBase):
    """Qwen2.5-VL, the vision-language model Qwen-Image encodes its prompts (and Edit its images) with."""

    model_type: Literal[ModelType.Qwen25VL] = ModelType.Qwen25VL
    model_format: Literal[ModelFormat.Diffusers, ModelFormat.Checkpoint]
    #: a single file's config: the name of one shipped in ``services/configs/transformers``, or a path
    config: str | None = None


class Qwen3EncoderConfig(ModelConfigBase):
    """Qwen3, the language model Z-Image (Qwen3-4B) and FLUX.2 Klein (4B, 8B) encode their prompts with."""

    model_type: Literal[ModelType.Qwen3Encoder] = ModelType.Qwen3Encoder
    model_format: Literal[ModelFormat.Diffusers, ModelFormat.Checkpoint]
    #: a single file's config: the name of one shipped in ``services/configs/transformers``, or a path
    config: str | None = None


class MistralEncoderConfig(ModelConfigBase):
    """Mistral Small 3.x, the language model FLUX.2 dev encodes its prompts with."""

    model_type: Literal[ModelType.MistralEncoder] = ModelType.MistralEncoder
    model_format: Literal[ModelFormat.Diffusers, ModelFormat.Checkpoint]
    #: a single file's config: the name of one shipped in ``services/configs/transformers``, or a path
    config: str | None = None


CONCRETE_CONFIGS: tuple[type[ModelConfigBase], ...] = (
    MainCheckpointConfig, MainDiffusersConfig, ONNXSD2Config, VaeCheckpointConfig, VaeDiffusersConfig,
    LoRALycorisConfig, LoRADiffusersConfig, TextualInversionFileConfig, TextualInversionFolderConfig,
    ControlNetCheckpointConfig, ControlNetDiffusersConfig, IPAdapterConfig, IPAdapterCheckpointConfig,
    CLIPVisionDiffusersConfig, CLIPVisionCheckpointConfig, T2IAdapterConfig, T2IAdapterCheckpointConfig,
    T5EncoderConfig, T5EncoderCheckpointConfig,
    MainGGUFConfig, MainBnbQuantizedConfig, FluxReduxConfig, SpandrelImageToImageConfig, SigLIPConfig,
    LlavaOnevisionConfig, Qwen25VLConfig, Qwen3EncoderConfig, MistralEncoderConfig, CLIPEmbedCheckpointConfig,
    CLIPEmbedDiffusersConfig,
)


def _pairs(cls: type[ModelConfigBase]) -> list[tuple[ModelType, ModelFormat]]:
    type_ = cls.model_fields["model_type"].default
    ann = cls.model_fields["model_format"].annotation
    formats = getattr(ann, "__args__", ())
    return [(type_, fmt) for fmt in formats]


def tag_of(model_type: str, model_format: str) -> str:
    """The union tag of a (type, format) pair, e.g. ``main/checkpoint``."""
    return f"{model_type}/{model_format}"


#: (model_type, model_format) -> concrete class
CONFIG_CLASSES: dict[tuple[ModelType, ModelFormat], type[ModelConfigBase]] = {
    pair: cls for cls in CONCRETE_CONFIGS for pair in _pairs(cls)
}
#: "type/format" -> concrete class (the same table keyed by plain strings, for fast lookups)
CLASSES_BY_TAG: dict[str, type[ModelConfigBase]] = {
    tag_of(t.value, f.value): cls for (t, f), cls in CONFIG_CLASSES.items()
}


def _discriminate(value: Any) -> str | None:
    if isinstance(value, dict):
        type_, fmt = value.get("model_type"), value.get("model_format")
    else:
        type_, fmt = getattr(value, "model_type", None), getattr(value, "model_format", None)
    if type_ is None or fmt is None:
        return None
    return tag_of(str(getattr(type_, "value", type_)), str(getattr(fmt, "value", fmt)))


AnyModelConfig = Annotated[
    Union[  # noqa: UP007 - one member per line reads better as Union[...]
        Annotated[MainCheckpointConfig, Tag("main/checkpoint")],
        Annotated[MainDiffusersConfig, Tag("main/diffusers")],
        Annotated[ONNXSD2Config, Tag("onnx/onnx")],
        Annotated[ONNXSD2Config, Tag("onnx/olive")],
        Annotated[VaeCheckpointConfig, Tag("vae/checkpoint")],
        Annotated[VaeDiffusersConfig, Tag("vae/diffusers")],
        Annotated[LoRALycorisConfig, Tag("lora/lycoris")],
        Annotated[LoRADiffusersConfig, Tag("lora/diffusers")],
        Annotated[TextualInversionFileConfig, Tag("embedding/embedding_file")],
        Annotated[TextualInversionFolderConfig, Tag("embedding/embedding_folder")],
        Annotated[ControlNetCheckpointConfig, Tag("controlnet/checkpoint")],
        Annotated[ControlNetDiffusersConfig, Tag("controlnet/diffusers")],
        Annotated[IPAdapterConfig, Tag("ip_adapter/invokeai")],
        Annotated[IPAdapterCheckpointConfig, Tag("ip_adapter/checkpoint")],
        Annotated[CLIPVisionDiffusersConfig, Tag("clip_vision/diffusers")],
        Annotated[CLIPVisionCheckpointConfig, Tag("clip_vision/checkpoint")],
        Annotated[T2IAdapterConfig, Tag("t2i_adapter/diffusers")],
        Annotated[T2IAdapterCheckpointConfig, Tag("t2i_adapter/checkpoint")],
        Annotated[T5EncoderConfig, Tag("t5_encoder/t5_encoder")],
        Annotated[T5EncoderCheckpointConfig, Tag("t5_encoder/checkpoint")],
        Annotated[MainGGUFConfig, Tag("main/gguf")],
        Annotated[MainBnbQuantizedConfig, Tag("main/bnb_quantized_nf4b")],
        Annotated[MainBnbQuantizedConfig, Tag("main/bnb_quantized_int8b")],
        Annotated[FluxReduxConfig, Tag("flux_redux/checkpoint")],
        Annotated[SpandrelImageToImageConfig, Tag("spandrel_image_to_image/checkpoint")],
        Annotated[SigLIPConfig, Tag("siglip/diffusers")],
        Annotated[SigLIPConfig, Tag("siglip/checkpoint")],
        Annotated[LlavaOnevisionConfig, Tag("llava_onevision/diffusers")],
        Annotated[Qwen25VLConfig, Tag("qwen2_5_vl/diffusers")],
        Annotated[Qwen25VLConfig, Tag("qwen2_5_vl/checkpoint")],
        Annotated[Qwen3EncoderConfig, Tag("qwen3_encoder/diffusers")],
        Annotated[Qwen3EncoderConfig, Tag("qwen3_encoder/checkpoint")],
        Annotated[MistralEncoderConfig, Tag("mistral_encoder/diffusers")],
        Annotated[MistralEncoderConfig, Tag("mistral_encoder/checkpoint")],
        Annotated[CLIPEmbedCheckpointConfig, Tag("clip_embed/checkpoint")],
        Annotated[CLIPEmbedDiffusersConfig, Tag("clip_embed/diffusers")],
    ],
    Discriminator(_discriminate),
]
AnyModelConfigAdapter: TypeAdapter[Any] = TypeAdapter(AnyModelConfig, config=ConfigDict(defer_build=True))
