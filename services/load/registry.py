"""Which loader handles a record: the table keyed by (model type, model format)."""

from __future__ import annotations

from modelbus.services.load import bnb, checkpoints, gguf, ip_adapters, loaders, text_encoders, upscalers
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import Loader
from modelbus.services.records.enums import ModelFormat, ModelType

LOADERS: dict[tuple[ModelType, ModelFormat], Loader] = {
    (ModelType.Main, ModelFormat.Diffusers): loaders.load_diffusers_main,
    (ModelType.Main, ModelFormat.Checkpoint): checkpoints.load_main_checkpoint,
    (ModelType.Vae, ModelFormat.Diffusers): loaders.load_diffusers_vae,
    (ModelType.Vae, ModelFormat.Checkpoint): checkpoints.load_vae_checkpoint,
    (ModelType.ControlNet, ModelFormat.Diffusers): loaders.load_diffusers_controlnet,
    (ModelType.ControlNet, ModelFormat.Checkpoint): checkpoints.load_controlnet_checkpoint,
    (ModelType.Lora, ModelFormat.Lycoris): loaders.load_lora,
    (ModelType.Lora, ModelFormat.Diffusers): loaders.load_lora,
    (ModelType.TextualInversion, ModelFormat.EmbeddingFile): loaders.load_textual_inversion,
    (ModelType.TextualInversion, ModelFormat.EmbeddingFolder): loaders.load_textual_inversion,
    (ModelType.T2IAdapter, ModelFormat.Diffusers): loaders.load_diffusers_t2i_adapter,
    (ModelType.T2IAdapter, ModelFormat.Checkpoint): loaders.load_t2i_adapter_checkpoint,
    (ModelType.T5Encoder, ModelFormat.Checkpoint): loaders.load_t5_encoder_checkpoint,
    (ModelType.CLIPVision, ModelFormat.Checkpoint): loaders.load_clip_vision_checkpoint,
    (ModelType.CLIPVision, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.CLIPEmbed, ModelFormat.Checkpoint): loaders.load_clip_embed_checkpoint,
    (ModelType.CLIPEmbed, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.T5Encoder, ModelFormat.T5Encoder): loaders.load_transformers_folder,
    (ModelType.IPAdapter, ModelFormat.Checkpoint): ip_adapters.load_ip_adapter,
    (ModelType.IPAdapter, ModelFormat.InvokeAI): ip_adapters.load_ip_adapter,
    (ModelType.Main, ModelFormat.BnbQuantizedNF4): bnb.load_bnb_main,
    (ModelType.Main, ModelFormat.BnbQuantizedInt8): bnb.load_bnb_main,
    (ModelType.Main, ModelFormat.GGUF): gguf.load_gguf_main,
    (ModelType.Qwen25VL, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.SpandrelImageToImage, ModelFormat.Checkpoint): upscalers.load_spandrel,
    (ModelType.SigLIP, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.LlavaOnevision, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.Qwen25VL, ModelFormat.Checkpoint): text_encoders.load_llm_checkpoint,
    (ModelType.Qwen3Encoder, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.Qwen3Encoder, ModelFormat.Checkpoint): text_encoders.load_llm_checkpoint,
    (ModelType.MistralEncoder, ModelFormat.Diffusers): loaders.load_transformers_folder,
    (ModelType.MistralEncoder, ModelFormat.Checkpoint): text_encoders.load_llm_checkpoint,
}


def loader_for(model_type: ModelType | str, model_format: ModelFormat | str) -> Loader:
    """The loader for a record's type and format; :class:`InvalidModelException` when there is none."""
    try:
        return LOADERS[(ModelType(model_type), ModelFormat(model_format))]
    except (KeyError, ValueError) as exc:
        raise InvalidModelException(f"no loader for {model_type}/{model_format} models") from exc
