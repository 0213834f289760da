"""Rules for the diffusion transformers of 2025-2026: FLUX.2, Chroma, Qwen-Image, Wan, Z-Image, HiDream-I1,
Lumina 2, Sana, LTX-Video (1 and 2) and HunyuanVideo (1 and 1.5).

Each family is recognised from key names that no other family has, in each layout in circulation: the
diffusers layout (``<Class>.state_dict()``), the original release's and ComfyUI's (the original names,
often under ``model.diffusion_model.``), with or without a ``transformer.`` prefix. The markers are those
diffusers' own single-file loader looks for (``CHECKPOINT_KEY_NAMES`` in
``diffusers.loaders.single_file_utils``) plus the diffusers-layout names of the same tensors. Within a
family the shapes tell the sizes (hidden width, input channels): ``config_path`` names the shipped config
of that size (``services/configs/diffusers/<name>/transformer/config.json``).

Where the shapes are the same for two families (Wan 2.1 and 2.2 14B text-to-video), or for two variants
of one (FLUX.1 dev and Kontext, Qwen-Image and its Edit), the file's name and metadata decide; for two
bases, without them it is "cannot tell", naming the candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelbus.services.probe.errors import UnrecognizedFilesError
from modelbus.services.probe.result import ProbeResult, compatible_bases
from modelbus.services.probe.tensors import TensorIndex
from modelbus.services.records.enums import BaseModelType as Base
from modelbus.services.records.enums import ModelFormat, ModelType
from modelbus.services.records.enums import ModelVariantType as V

_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "net.")


@dataclass(frozen=True)
class View:
    """A file's tensors seen under the prefix its transformer is stored at."""

    index: TensorIndex
    prefix: str

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.index.shapes.get(self.prefix + key)

    def has(self, *keys: str) -> bool:
        return all(self.prefix + k in self.index.shapes for k in keys)

    def has_prefix(self, *prefixes: str) -> bool:
        return self.index.has_prefix(*(self.prefix + p for p in prefixes))

    def dim(self, key: str, axis: int) -> int | None:
        shape = self.shape(key)
        return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None

    def hint(self, *words: str) -> bool:
        """Whether the file name or its metadata mention one of ``words`` (for same-shape variants)."""
        text = " ".join([self.index.path.name, *self.index.metadata.values()]).lower()
        return any(re.search(rf"(^|[^a-z0-9]){w}", text) for w in words)


def view(index: TensorIndex, *anchors: str) -> View | None:
    """The view under which all ``anchors`` exist, if any."""
    for prefix in _PREFIXES:
        if all(prefix + a in index.shapes for a in anchors):
            return View(index, prefix)
    return None


def main(base: Base, config: str | None, variant: V = V.Normal, notes: str | None = None) -> ProbeResult:
    return ProbeResult(model_type=ModelType.Main, model_format=ModelFormat.Checkpoint, base_model=base,
                       variant=variant, config_path=config, compatible_bases=compatible_bases(ModelType.Main, base),
                       notes=notes)  # fmt: skip


def cannot_tell(index: TensorIndex, what: str, candidates: list[Base], why: str) -> UnrecognizedFilesError:
    names = " or ".join(b.value for b in candidates)
    return UnrecognizedFilesError(
        f"{index.path}: cannot tell: a {what} of {names} ({why}); the file name and metadata do not say which; "
        f"pass base_model explicitly ({', '.join(b.value for b in candidates)})",
        {"model_type": ModelType.Main, "model_format": ModelFormat.Checkpoint},
    )


# ------------------------------------------------------------------------------------- FLUX.2, Chroma

# hidden width -> the FLUX.2 size (its text encoder's hidden width x 3 is the context width)
_FLUX2_SIZES = {6144: "flux2-dev", 3072: "flux2-klein-4b", 4096: "flux2-klein-9b"}


def probe_flux2(index: TensorIndex) -> ProbeResult | None:
    """FLUX.2: shared modulation for all double/single blocks (``double_stream_modulation_img``)."""
    v = view(index, "double_stream_modulation_img.lin.weight", "img_in.weight") or view(
        index, "double_stream_modulation_img.linear.weight", "x_embedder.weight")
    if v is None:
        return None
    width = v.dim("img_in.weight", 0) or v.dim("x_embedder.weight", 0)
    config = _FLUX2_SIZES.get(width or 0)
    notes = None if config else f"FLUX.2 transformer of an unpublished width {width}"
    return main(Base.Flux2, config, notes=notes)


def probe_chroma(index: TensorIndex) -> ProbeResult | None:
    """Chroma: FLUX.1-schnell's blocks, its modulations computed by ``distilled_guidance_layer``."""
    v = view(index, "distilled_guidance_layer.in_proj.weight")
    if v is None:
        return None
    return main(Base.Chroma, "chroma")


# ----------------------------------------------------------------------------------------- Qwen-Image


def probe_qwen_image(index: TensorIndex) -> ProbeResult | None:
    """Qwen-Image (and -Edit, same shapes): ``txt_norm`` over Qwen2.5-VL's 3584-wide states; 2.1 keeps
    the norm inside ``txt_in`` (``txt_in.text_norm``)."""
    v21 = view(index, "txt_in.text_norm.weight", "img_in.weight")
    if v21 is not None:
        return main(Base.QwenImage21, "qwen-image-2.1")
    v = view(index, "txt_norm.weight", "img_in.weight", "txt_in.weight")
    if v is None:
        return None
    if v.hint("edit", "qwen_image_edit", "qwen-image-edit"):
        return main(Base.QwenImage, "qwen-image", V.Edit,
                    "Qwen-Image-Edit has Qwen-Image's shapes: the file name or metadata said edit")  # fmt: skip
    return main(Base.QwenImage, "qwen-image")


# ------------------------------------------------------------------------------------------------ Wan


def probe_wan(index: TensorIndex) -> ProbeResult | None:
    """Wan 2.1/2.2. Width 1536 is 2.1's 1.3B, 3072 with 48 latent channels 2.2's TI2V 5B, 5120 the 14B
    models: image-to-video takes 36 input channels (latents + mask + image), and 2.1's also embeds CLIP
    image features (``img_emb`` / ``image_embedder``), which 2.2's A14B dropped. The 14B text-to-video
    models of 2.1 and 2.2 (each 2.2 expert alone) have the same shapes."""
    original = view(index, "head.modulation", "patch_embedding.weight")
    diffusers = view(index, "condition_embedder.time_proj.weight", "patch_embedding.weight")
    v = original or diffusers
    if v is None:
        return None
    patch = v.shape("patch_embedding.weight") or ()
    width, channels = (patch[0], patch[1]) if len(patch) == 5 else (None, None)
    clip_image = v.has_prefix("img_emb.", "condition_embedder.image_embedder.")
    vace = v.has_prefix("vace_blocks.")
    notes = "VACE (control) model" if vace else None
    if width == 1536:
        return main(Base.Wan21, "wan-2.1-t2v-1.3b", V.TextToVideo, notes)
    if width == 3072 and channels == 48:
        return main(Base.Wan22, "wan-2.2-ti2v-5b", V.TextImageToVideo, notes)
    if width == 5120 and channels == 36:
        if clip_image:
            return main(Base.Wan21, "wan-2.1-i2v-14b", V.ImageToVideo, notes)
        return main(Base.Wan22, "wan-2.2-i2v-a14b", V.ImageToVideo, notes)
    if width == 5120 and channels == 16:
        if v.hint("wan2.2", "wan2_2", "wan22", "wan-2.2", "a14b", "high_noise", "low_noise", "high-noise", "low-noise"):
            return main(Base.Wan22, "wan-2.2-t2v-a14b", V.TextToVideo, notes)
        if v.hint("wan2.1", "wan2_1", "wan21", "wan-2.1"):
            return main(Base.Wan21, "wan-2.1-t2v-14b", V.TextToVideo, notes)
        raise cannot_tell(index, "14B Wan text-to-video transformer", [Base.Wan21, Base.Wan22],
                          "Wan 2.1 14B and each Wan 2.2 A14B expert have the same shapes")  # fmt: skip
    raise UnrecognizedFilesError(
        f"{index.path}: Wan-style video transformer of width {width} and {channels} input channels, which "
        "matches no published Wan (1536x16 2.1 1.3B, 5120x16/36 14B, 3072x48 2.2 5B); pass base_model explicitly",
        {"model_type": ModelType.Main, "model_format": ModelFormat.Checkpoint},
    )


# ------------------------------------------------------------------ Z-Image, Lumina 2, HiDream, Sana


def probe_z_image(index: TensorIndex) -> ProbeResult | None:
    """Z-Image: Lumina-style refiners, plus learned pad tokens (``x_pad_token``) Lumina 2 has not."""
    v = view(index, "x_pad_token", "cap_pad_token")
    if v is None or not (v.has_prefix("all_x_embedder.", "x_embedder.") and v.has_prefix("layers.")):
        return None
    return main(Base.ZImage, "z-image-turbo")


def probe_lumina2(index: TensorIndex) -> ProbeResult | None:
    """Lumina-Image 2.0: caption embedder and refiners; diffusers nests it in ``time_caption_embed``."""
    v = view(index, "time_caption_embed.caption_embedder.0.weight") or view(index, "cap_embedder.0.weight")
    if v is None or not v.has_prefix("noise_refiner.", "context_refiner.") or v.has("x_pad_token"):
        return None
    return main(Base.Lumina2, "lumina-2")


def probe_hidream(index: TensorIndex) -> ProbeResult | None:
    """HiDream-I1 (Full, Dev, Fast share the shapes): mixture-of-experts ``double_stream_blocks``."""
    v = view(index, "double_stream_blocks.0.block.adaLN_modulation.1.bias")
    if v is None:
        return None
    return main(Base.HiDream, "hidream-i1")


_SANA_SIZES = {2240: "sana-1600m", 1152: "sana-600m"}


def probe_sana(index: TensorIndex) -> ProbeResult | None:
    """Sana: linear attention with a GLUMBConv feed-forward (``ff.conv_inverted`` / ``mlp.inverted_conv``)."""
    v = view(index, "transformer_blocks.0.ff.conv_inverted.weight") or view(
        index, "blocks.0.mlp.inverted_conv.conv.weight")
    if v is None:
        return None
    width = v.dim("transformer_blocks.0.ff.conv_inverted.weight", 1) or v.dim(
        "blocks.0.mlp.inverted_conv.conv.weight", 1)
    config = _SANA_SIZES.get(width or 0)
    return main(Base.Sana, config, notes=None if config else f"Sana of an unpublished width {width}")


# ------------------------------------------------------------------------- LTX-Video, HunyuanVideo

_LTX_SIZES = {2048: "ltx-video-2b", 4096: "ltx-video-13b"}


def probe_ltx(index: TensorIndex) -> ProbeResult | None:
    """LTX-2 (audio and video streams: ``audio_proj_in`` / ``audio_patchify_proj``, the a2v cross
    attention), else LTX-Video (``patchify_proj`` / ``proj_in`` with per-block ``scale_shift_table``)."""
    if view(index, "audio_proj_in.weight", "proj_in.weight") or view(
            index, "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight"):
        return main(Base.LTXVideo2, "ltx-2")
    v = view(index, "patchify_proj.weight", "adaln_single.linear.weight") or view(
        index, "proj_in.weight", "time_embed.linear.weight", "caption_projection.linear_1.weight",
        "transformer_blocks.0.scale_shift_table")
    if v is None:
        return None
    width = v.dim("patchify_proj.weight", 0) or v.dim("proj_in.weight", 0)
    if v.has_prefix("transformer_blocks.0.ff.conv_inverted."):
        return None  # Sana's
    config = _LTX_SIZES.get(width or 0)
    return main(Base.LTXVideo, config, V.TextImageToVideo,
                None if config else f"LTX-Video of an unpublished width {width}")  # fmt: skip


def probe_hunyuan_video(index: TensorIndex) -> ProbeResult | None:
    """HunyuanVideo: a token refiner over LLaVA-LLaMA states (``txt_in.individual_token_refiner`` /
    ``context_embedder.token_refiner``) and a 3-D patch embedding; 1.5 adds a second text embedder (ByT5,
    ``context_embedder_2`` / ``byt5_in``) and a SigLIP image embedder, and drops the single-stream blocks."""
    v = view(index, "context_embedder.token_refiner.refiner_blocks.0.norm1.weight") or view(
        index, "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias")
    if v is None:
        return None
    if v.has_prefix("context_embedder_2.", "byt5_in."):
        return main(Base.HunyuanVideo15, "hunyuan-video-1.5", V.TextImageToVideo)
    patch = v.shape("x_embedder.proj.weight") or v.shape("img_in.proj.weight") or ()
    channels = patch[1] if len(patch) == 5 else None
    if channels == 33:  # latents + the image's latents + a mask channel: HunyuanVideo-I2V
        return main(Base.HunyuanVideo, "hunyuan-video-i2v", V.ImageToVideo)
    return main(Base.HunyuanVideo, "hunyuan-video", V.TextToVideo)


#: in order: each rule's markers are absent from the families after it
DIT_RULES = (
    probe_flux2, probe_chroma, probe_qwen_image, probe_wan, probe_z_image, probe_lumina2, probe_hidream,
    probe_sana, probe_ltx, probe_hunyuan_video,
)


def probe_dit(index: TensorIndex) -> ProbeResult | None:
    for rule in DIT_RULES:
        result = rule(index)
        if result is not None:
            return result
    return None
