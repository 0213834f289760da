"""The string enums that classify a model (values are the spec's and InvokeAI's)."""

from __future__ import annotations

from enum import Enum


class ModelType(str, Enum):
    Main = "main"
    Vae = "vae"
    Lora = "lora"
    ControlNet = "controlnet"
    TextualInversion = "embedding"
    IPAdapter = "ip_adapter"
    CLIPVision = "clip_vision"
    CLIPEmbed = "clip_embed"  # a CLIP text encoder alone (FLUX.1's and SD-3's CLIP-L, as InvokeAI names it)
    T2IAdapter = "t2i_adapter"
    T5Encoder = "t5_encoder"
    ONNX = "onnx"
    FluxRedux = "flux_redux"
    SpandrelImageToImage = "spandrel_image_to_image"
    SigLIP = "siglip"
    LlavaOnevision = "llava_onevision"
    Qwen25VL = "qwen2_5_vl"  # Qwen2.5-VL, Qwen-Image's (and HunyuanVideo 1.5's) text encoder
    Qwen3Encoder = "qwen3_encoder"  # Qwen3, Z-Image's and FLUX.2 Klein's text encoder
    MistralEncoder = "mistral_encoder"  # Mistral Small 3.x, FLUX.2 dev's text encoder


class ModelFormat(str, Enum):
    Diffusers = "diffusers"
    Checkpoint = "checkpoint"
    Lycoris = "lycoris"
    Onnx = "onnx"
    Olive = "olive"
    EmbeddingFile = "embedding_file"
    EmbeddingFolder = "embedding_folder"
    InvokeAI = "invokeai"
    T5Encoder = "t5_encoder"
    GGUF = "gguf"
    BnbQuantizedNF4 = "bnb_quantized_nf4b"
    BnbQuantizedInt8 = "bnb_quantized_int8b"


class BaseModelType(str, Enum):
    Any = "any"
    StableDiffusion1 = "sd-1"
    StableDiffusion2 = "sd-2"
    StableDiffusionXL = "sdxl"
    StableDiffusionXLRefiner = "sdxl-refiner"
    StableDiffusion3 = "sd-3"
    Flux = "flux"
    StableDiffusion35Medium = "sd-3.5-medium"
    StableDiffusion35Large = "sd-3.5-large"
    Chroma = "chroma"
    Flux2 = "flux2"
    QwenImage = "qwen-image"
    QwenImage21 = "qwen-image-2.1"
    Wan21 = "wan-2.1"
    Wan22 = "wan-2.2"
    ZImage = "z-image"
    HiDream = "hidream"
    Lumina2 = "lumina-2"
    Sana = "sana"
    LTXVideo = "ltx-video"
    LTXVideo2 = "ltx-2"
    HunyuanVideo = "hunyuan-video"
    HunyuanVideo15 = "hunyuan-video-1.5"


class ModelVariantType(str, Enum):
    Normal = "normal"
    Inpaint = "inpaint"
    Depth = "depth"
    Kontext = "kontext"  # FLUX.1 Kontext: same shapes as dev, told by name or metadata
    Control = "control"  # FLUX.1 Canny/Depth: the control image concatenated to the latents
    Edit = "edit"  # Qwen-Image-Edit: same shapes as Qwen-Image, told by name or metadata
    TextToVideo = "t2v"
    ImageToVideo = "i2v"
    TextImageToVideo = "ti2v"


class SchedulerPredictionType(str, Enum):
    Epsilon = "epsilon"
    VPrediction = "v_prediction"
    Sample = "sample"


class SubModelType(str, Enum):
    UNet = "unet"
    TextEncoder = "text_encoder"
    TextEncoder2 = "text_encoder_2"
    Tokenizer = "tokenizer"
    Tokenizer2 = "tokenizer_2"
    Vae = "vae"
    VaeDecoder = "vae_decoder"
    VaeEncoder = "vae_encoder"
    Scheduler = "scheduler"
    SafetyChecker = "safety_checker"
    Transformer = "transformer"
    TextEncoder3 = "text_encoder_3"
    Tokenizer3 = "tokenizer_3"
