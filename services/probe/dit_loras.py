"""The base of a LoRA of a 2025-2026 diffusion transformer (FLUX.2, Qwen-Image, Wan, Chroma, HunyuanVideo,
Z-Image, Lumina 2, LTX-Video, LTX-2, HiDream, Sana) from the names of the layers it adapts and their widths.

The trainers write the same layer under different spellings: PEFT/diffusers
(``transformer.blocks.0.attn1.to_q.lora_A.weight``), ai-toolkit, diffusion-pipe and ComfyUI the original
release's names under ``diffusion_model.`` (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``), kohya,
musubi-tuner and OneTrainer the same names with ``_`` for ``.`` (``lora_unet_blocks_0_self_attn_q.lora_down
.weight``). Each key is reduced to the adapted layer's name with every ``.`` made ``_`` (one spelling for
all), and the layer's input and output widths (``lora_A``/``lora_down``: ``(rank, in)``; ``lora_B``/
``lora_up``: ``(out, rank)``). What tells the families apart:

- Wan: ``blocks.N`` with ``self_attn``/``cross_attn``/``ffn`` (``attn1``/``attn2``/``ffn.net`` in diffusers'
  names); width 1536 is 2.1's 1.3B, 3072 2.2's 5B, 5120 the 14B models, of which only 2.1's image-to-video
  has image projections (``k_img``, ``add_k_proj``); a 14B LoRA without them fits 2.1 and 2.2 alike.
- Qwen-Image: per-stream ``img_mlp``/``txt_mlp``/``img_mod``/``txt_mod`` in its 60 ``transformer_blocks``;
  2.1 (4096 wide) has one stream, its MLP ``img_mlp.proj``/``gate_layer``/``out``.
- FLUX.2: the shared modulations, SwiGLU ``ff.linear_in``/``linear_out``, fused single-block
  ``to_qkv_mlp_proj``; in BFL names (``double_blocks``/``single_blocks``, as FLUX.1) its MLP ratio of 3
  (FLUX.1's is 4) or its width (Klein 9B 4096, dev 6144).
- Chroma: ``distilled_guidance_layer``; FLUX.1: the per-block modulations Chroma pruned (``norm1.linear``,
  ``img_mod.lin``, ``modulation.lin``). Chroma keeps all of FLUX.1's other layers at the same widths: a LoRA
  of those alone is recorded as FLUX.1's (the common case) unless its name or metadata says Chroma.
- Z-Image and Lumina 2: single-stream ``layers.N`` (``attention``/``attn``, ``feed_forward``), 3840 and 2304
  wide.
- HunyuanVideo: FLUX.1's layers in diffusers' names, but 20 double and 40 single blocks (FLUX.1's 19 and 38);
  in its own names ``img_mod.linear`` (BFL's ``img_mod.lin``) and its token refiner.
- LTX-Video, LTX-2 and Sana: ``transformer_blocks.N.attn1``/``attn2`` (self- and cross-attention; FLUX-style
  families name theirs ``attn``), LTX's ``ff.net``. LTX-Video 2B is 2048 wide; LTX-Video 13B and LTX-2's video
  stream 4096, so an LTX-2 LoRA shows itself by its audio layers (``audio_attn1``, ``audio_to_video_attn``,
  ``audio_ff``...) or its name, else "cannot tell"; Sana is 1152 (600M) or 2240 (1600M) wide, its
  feed-forward convolutional (PixArt, also 1152, has ``ff.net`` linears: not taken). The trainers (LTX's own,
  ai-toolkit, diffusion-pipe) write diffusers' module names under ``diffusion_model.``, as diffusers' LoRA
  conversions for LTX read them.
- HiDream-I1: ``double_stream_blocks.N.block``/``single_stream_blocks.N.block`` (its own names, which the
  trainers keep), 2560 wide.
- A LoRA of 3072-wide attention alone fits FLUX.1, Chroma, FLUX.2 Klein 4B and Qwen-Image (with 20 blocks,
  HunyuanVideo and Qwen-Image; past 20, Qwen-Image): the file's name or metadata decides, else "cannot
  tell" naming them.

Widths of SD-3's MMDiT (1536, 2432) are left to the SD-3 rules (``None``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelbus.services.probe.errors import UnrecognizedFilesError
from modelbus.services.probe.tensor_index import TensorIndex
from modelbus.services.records.enums import BaseModelType as Base

# the weight names of a low-rank pair: group 1 is the adapted layer, group 2 says down (A) or up (B)
_PAIR = re.compile(r"^(.+?)\.(?:lora_(A|B)(?:\.default)?|lora_(down|up)|lora\.(down|up))\.weight$")
_LYCORIS = re.compile(r"^(.+?)\.(hada_w1_a|hada_w1_b|lokr_w[12](?:_[ab])?)$")  # LoHa, LoKr factors
_PREFIX = re.compile(r"^(?:base_model\.model\.|model\.diffusion_model\.|diffusion_model\.|transformer\.|"
                     r"lora_unet_|lora_transformer_|lycoris_)+")  # fmt: skip
_SD3_WIDTHS = frozenset({1536, 2432})

_WAN = re.compile(r"^blocks_\d+_(?:self_attn_[qkvo]|cross_attn_(?:[qkvo]|k_img|v_img)|attn[12]_(?:to_[qkv]|to_out_0|"
                  r"add_[kv]_proj)|ffn_(?:0|2|net_0_proj|net_2))$")  # fmt: skip
_WAN_IMAGE = re.compile(r"_(?:k_img|v_img|attn2_add_[kv]_proj)$")
_CHROMA = re.compile(r"^distilled_guidance_layer_")
_QWEN = re.compile(r"^transformer_blocks_\d+_(?:img|txt)_(?:mlp_net_|mod_1$)")
_QWEN21 = re.compile(r"^transformer_blocks_\d+_img_mlp_(?:proj|out|gate_layer)$")
_FLUX2 = re.compile(r"^(?:transformer_blocks_\d+_ff(?:_context)?_linear_(?:in|out)|single_transformer_blocks_\d+_attn_"
                    r"(?:to_qkv_mlp_proj|to_out)|(?:double|single)_stream_modulation)")  # fmt: skip
_FLUX1 = re.compile(r"^(?:transformer_blocks_\d+_norm1(?:_context)?_linear|single_transformer_blocks_\d+_norm_linear|"
                    r"double_blocks_\d+_(?:img|txt)_mod_lin|single_blocks_\d+_modulation_lin|vector_in_|"
                    r"time_text_embed_text_embedder_)")  # fmt: skip
# diffusers-named layers FLUX.1 and Chroma share (and no other family has): FLUX.1's single blocks and MLPs
_FLUX1_OR_CHROMA = re.compile(r"^(?:single_transformer_blocks_\d+_(?:proj_mlp|proj_out|attn_to_[qkv])|"
                              r"transformer_blocks_\d+_ff(?:_context)?_net_)")  # fmt: skip
# HunyuanVideo's blocks are FLUX.1's in diffusers' names, 20 and 40 of them (FLUX.1 and Chroma have 19 and 38);
# its own names say ``img_mod.linear`` where BFL's say ``img_mod.lin``, and its token refiner is its own
_HUNYUAN = re.compile(r"^(?:context_embedder_token_refiner_|txt_in_individual_token_refiner_|"
                      r"double_blocks_\d+_(?:img|txt)_mod_linear$|single_blocks_\d+_modulation_linear$)")  # fmt: skip
_DOUBLE = re.compile(r"^(?:transformer_blocks|double_blocks)_(\d+)_")
_SINGLE = re.compile(r"^(?:single_transformer_blocks|single_blocks)_(\d+)_")
# Z-Image's and Lumina 2's single-stream ``layers`` (and refiners), in diffusers' names and the originals'
# (``attention.qkv``, ``feed_forward.w1``); the width tells them: Z-Image 3840, Lumina 2 2304
_LUMINA_STYLE = re.compile(r"^(?:layers|noise_refiner|context_refiner)_\d+_(?:attention_(?:to_[qkv]|to_out_0|qkv|out)|"
                           r"attn_(?:to_[qkv]|to_out_0)|feed_forward_(?:w[123]|linear_[123])|adaLN_modulation_[01]|"
                           r"norm1_linear)$")  # fmt: skip
_LUMINA_WIDTHS = {3840: Base.ZImage, 2304: Base.Lumina2}
_BFL = re.compile(r"^(?:double_blocks|single_blocks)_(\d+)_")
_LTX_STYLE = re.compile(r"^transformer_blocks_\d+_(?:(?:audio_)?attn[12]_(?:to_[qkv]|to_out_0)|"
                        r"(?:audio_to_video|video_to_audio)_attn_(?:to_[qkv]|to_out_0)|(?:audio_)?ff_net_(?:0_proj|2))$")
_LTX2_AUDIO = re.compile(r"_(?:audio_attn[12]|audio_to_video_attn|video_to_audio_attn|audio_ff)_")
_SELF_ATTENTION = re.compile(r"^transformer_blocks_\d+_attn1_to_[qkv]$")
_FF_LINEAR = re.compile(r"_ff_net_(?:0_proj|2)$")
_SANA_WIDTHS = frozenset({1152, 2240})
_HIDREAM = re.compile(r"^(?:double|single)_stream_blocks_\d+_block_")
_ATTENTION = re.compile(r"^transformer_blocks_(\d+)_attn_")


@dataclass(frozen=True)
class Layers:
    """The layers a LoRA adapts: name (``.`` as ``_``, no trainer prefix) -> (in, out) widths, each when known."""

    index: TensorIndex
    widths: dict[str, tuple[int | None, int | None]]

    def matching(self, pattern: re.Pattern[str]) -> dict[str, tuple[int | None, int | None]]:
        return {k: v for k, v in self.widths.items() if pattern.search(k)}

    def ins(self, pattern: re.Pattern[str]) -> set[int]:
        return {i for i, _ in self.matching(pattern).values() if i is not None}

    def hint(self, *patterns: str) -> bool:
        """Whether the file's name or its metadata match one of ``patterns`` (for same-shape families)."""
        text = " ".join([self.index.path.name, *self.index.metadata.values()]).lower()
        return any(re.search(rf"(?:^|[^a-z0-9]){p}", text) for p in patterns)


def adapted_layers(index: TensorIndex) -> Layers:
    widths: dict[str, tuple[int | None, int | None]] = {}
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in index.shapes.items():
        if (lycoris := _LYCORIS.match(key)) and len(shape) == 2:
            factors.setdefault(_layer_name(lycoris.group(1)), {})[lycoris.group(2)] = shape
            continue
        m = _PAIR.match(key)
        if m is None or len(shape) < 2:
            continue
        name = _layer_name(m.group(1))
        down = (m.group(2) or m.group(3) or m.group(4)) in ("A", "down")
        known_in, known_out = widths.get(name, (None, None))
        widths[name] = (shape[1], known_out) if down else (known_in, shape[0])
    for name, parts in factors.items():
        widths.setdefault(name, _lycoris_widths(parts))
    return Layers(index, widths)


def _layer_name(stem: str) -> str:
    return _PREFIX.sub("", stem).replace(".", "_")


def _lycoris_widths(parts: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """LoHa: ``W = (w1_a @ w1_b) * (w2_a @ w2_b)``, so (in, out) = (w1_b's columns, w1_a's rows). LoKr:
    ``W = kron(w1, w2)``, each factor whole or as ``_a @ _b``: in = w1's columns x w2's, out = their rows."""
    if "hada_w1_a" in parts or "hada_w1_b" in parts:
        a, b = parts.get("hada_w1_a"), parts.get("hada_w1_b")
        return (b[1] if b else None), (a[0] if a else None)

    def factor(n: str) -> tuple[int, int] | None:
        whole, left, right = parts.get(f"lokr_w{n}"), parts.get(f"lokr_w{n}_a"), parts.get(f"lokr_w{n}_b")
        if whole:
            return whole[0], whole[1]
        return (left[0], right[1]) if left and right else None

    w1, w2 = factor("1"), factor("2")
    if w1 is None or w2 is None:
        return None, None
    return w1[1] * w2[1], w1[0] * w2[0]


def dit_lora_base(index: TensorIndex) -> Base | None:
    """The base of a LoRA of one of these families; ``None`` when it is none of theirs (SD, SD-3, XLabs...)."""
    layers = adapted_layers(index)
    if not layers.widths:
        return None
    for rule in (_wan, _lumina_style, _hidream, _ltx_style, _hunyuan, _marked, _bfl, _attention_only):
        base = rule(layers)
        if base is not None:
            return base
    return None


def lora_notes(index: TensorIndex, base: Base) -> str | None:
    """What the record should say beside the base: a FLUX.1 LoRA whose layers Chroma has too."""
    if base is not Base.Flux:
        return None
    layers = adapted_layers(index)
    if not layers.widths or layers.matching(_FLUX1):
        return None
    return ("the layers it adapts are FLUX.1's and Chroma's alike (Chroma prunes only FLUX.1's modulations): "
            "recorded as flux; set base_model chroma for a Chroma LoRA")


def _cannot_tell(layers: Layers, what: str, candidates: list[Base]) -> UnrecognizedFilesError:
    names = ", ".join(b.value for b in candidates)
    return UnrecognizedFilesError(
        f"{layers.index.path}: cannot tell: a LoRA of {what}, which {names} all have at these widths; its name and "
        f"metadata do not say which; pass base_model explicitly ({names})"
    )


def _wan(layers: Layers) -> Base | None:
    blocks = layers.matching(_WAN)
    if not blocks:
        return None
    ins = {i for i, _ in blocks.values() if i is not None}
    width = min(ins) if ins else None
    if width == 1536:
        return Base.Wan21
    if width == 3072:
        return Base.Wan22
    if width == 5120:
        if layers.matching(_WAN_IMAGE):
            return Base.Wan21  # only 2.1's image-to-video 14B projects CLIP image features
        if layers.hint("wan2\\.?2", "wan2_2", "wan-2\\.2", "a14b", "high_noise", "low_noise", "high-noise", "low-noise"):
            return Base.Wan22
        if layers.hint("wan2\\.?1", "wan2_1", "wan-2\\.1"):
            return Base.Wan21
        raise _cannot_tell(layers, "a 14B Wan transformer (5120 wide, no image projections)", [Base.Wan21, Base.Wan22])
    raise UnrecognizedFilesError(f"{layers.index.path}: LoRA of a Wan-style video transformer of width {width}, "
                                 "which matches no published Wan (1536, 3072, 5120); pass base_model explicitly")


def _lumina_style(layers: Layers) -> Base | None:
    named = layers.matching(_LUMINA_STYLE)
    if not named:
        return None
    attention = {i for k, (i, _) in named.items() if i is not None and ("_attention_" in k or "_attn_" in k)}
    width = min(attention or {i for i, _ in named.values() if i is not None} or {0})
    if width in _LUMINA_WIDTHS:
        return _LUMINA_WIDTHS[width]
    raise UnrecognizedFilesError(f"{layers.index.path}: LoRA of a Lumina-style transformer (layers.N.attention) of "
                                 f"width {width}, which is neither Z-Image's (3840) nor Lumina 2's (2304); pass "
                                 "base_model explicitly")  # fmt: skip


def _hidream(layers: Layers) -> Base | None:
    named = layers.matching(_HIDREAM)
    if not named:
        return None
    width = min((i for k, (i, _) in named.items() if i is not None and "_attn1_to_" in k), default=None)
    if width in (None, 2560):
        return Base.HiDream
    raise UnrecognizedFilesError(f"{layers.index.path}: LoRA of a HiDream-style transformer (double_stream_blocks) "
                                 f"of width {width}, which is not HiDream-I1's (2560); pass base_model explicitly")


def _ltx_style(layers: Layers) -> Base | None:
    """``attn1``/``attn2`` blocks: LTX-Video, LTX-2, Sana, by the audio stream, the width and the MLP."""
    named = layers.matching(_LTX_STYLE)
    if not named:
        return None
    if layers.matching(_LTX2_AUDIO):
        return Base.LTXVideo2
    widths = {i for k, (i, _) in named.items() if i is not None and _SELF_ATTENTION.match(k)}
    widths = widths or {i for k, (i, _) in named.items() if i is not None and "_attn" in k}
    width = min(widths, default=None)
    if width is None or width in _SD3_WIDTHS:
        return None  # SD-3.5 medium's second attention is attn2 as well: the SD-3 rules' case
    if width == 2048:
        return Base.LTXVideo
    if width == 4096:
        if layers.hint("ltx[-_.]?2", "ltxv?[-_.]?2"):
            return Base.LTXVideo2
        if layers.hint("ltxv", "ltx[-_.]?video"):
            return Base.LTXVideo
        raise _cannot_tell(layers, "a 4096-wide LTX-style video transformer (attn1/attn2, no audio layers)",
                           [Base.LTXVideo, Base.LTXVideo2])
    if width in _SANA_WIDTHS and not layers.matching(_FF_LINEAR):
        return Base.Sana
    raise UnrecognizedFilesError(f"{layers.index.path}: LoRA of a transformer with attn1/attn2 blocks of width {width}"
                                 f"{' and linear feed-forwards (PixArt-style)' if layers.matching(_FF_LINEAR) else ''}"
                                 ", which matches no published LTX-Video (2048, 4096), LTX-2 (4096) or Sana (1152, "
                                 "2240); pass base_model explicitly")  # fmt: skip


def _hunyuan(layers: Layers) -> Base | None:
    if layers.matching(_HUNYUAN):
        return Base.HunyuanVideo
    if layers.matching(_QWEN) or layers.matching(_QWEN21) or 3072 not in layers.ins(_DOUBLE) | layers.ins(_SINGLE):
        return None
    doubles = _indices(layers, _DOUBLE)
    singles = _indices(layers, _SINGLE)
    joint_only = all(_ATTENTION.match(k) for k in layers.matching(_DOUBLE)) and not singles
    if (singles and max(singles) >= 38) or (doubles and max(doubles) >= 19 and not joint_only):
        return Base.HunyuanVideo  # past FLUX.1's 19 double / 38 single blocks, with FLUX.1's layers
    return None


def _indices(layers: Layers, pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for k in layers.widths if (m := pattern.match(k))}


def _marked(layers: Layers) -> Base | None:
    """Layers that one family alone has."""
    if layers.matching(_CHROMA):
        return Base.Chroma
    if layers.matching(_QWEN21):
        return Base.QwenImage21
    if layers.matching(_QWEN):
        return Base.QwenImage
    if layers.matching(_FLUX2):
        return Base.Flux2
    if layers.matching(_FLUX1):
        return Base.Flux
    if 3072 in layers.ins(_FLUX1_OR_CHROMA):
        return Base.Chroma if layers.hint("chroma") else Base.Flux
    return None


def _bfl(layers: Layers) -> Base | None:
    """BFL names (``double_blocks``/``single_blocks``), FLUX.1's and FLUX.2's: the MLP ratio and the width."""
    named = layers.matching(_BFL)
    if not named:
        return None
    width = min((i for k, (i, _) in named.items() if i is not None and ("_attn_" in k or k.endswith("_linear1"))),
                default=None)
    mlp = {o for k, (_, o) in named.items() if k.endswith("_mlp_0") and o} | {
        i for k, (i, _) in named.items() if k.endswith("_mlp_2") and i}
    linear1 = {o for k, (_, o) in named.items() if k.endswith("_linear1") and o}
    if width in (4096, 6144):
        return Base.Flux2
    if width is not None and (mlp or linear1):
        # FLUX.1: MLP 4 x width, single-block linear1 3 + 4; FLUX.2: SwiGLU of 3 x width, linear1 3 + 2 x 3
        if mlp & {4 * width} or linear1 & {7 * width}:
            return Base.Chroma if layers.hint("chroma") else Base.Flux
        if mlp & {3 * width, 6 * width} or linear1 & {9 * width}:
            return Base.Flux2
    return _by_name(layers, "FLUX-style attention (BFL names, 3072 wide)", [Base.Flux, Base.Chroma, Base.Flux2])


def _attention_only(layers: Layers) -> Base | None:
    """``transformer_blocks.N.attn`` alone: FLUX.1/Chroma/FLUX.2/Qwen-Image by width, block count and name."""
    attention = layers.matching(_ATTENTION)
    ins = {i for i, _ in attention.values() if i is not None}
    if not ins or ins & _SD3_WIDTHS:
        return None
    width = max(ins)
    blocks = max(int(m.group(1)) for k in attention if (m := _ATTENTION.match(k)))
    joint = any("_add_" in k or k.endswith("_to_add_out") for k in attention)
    if width == 6144:
        return Base.Flux2
    if width == 4096:
        if joint:
            return Base.Flux2  # Klein 9B's double blocks; Qwen-Image 2.1's attention is one stream
        if blocks >= 8:
            return Base.QwenImage21
        return _by_name(layers, "4096-wide single-stream attention", [Base.Flux2, Base.QwenImage21])
    if width == 3072:
        if blocks >= 20:
            return Base.QwenImage  # 60 blocks; HunyuanVideo has 20, FLUX.1 and Chroma 19, Klein 4B 5
        if blocks == 19:
            return _by_name(layers, "3072-wide joint attention of 20 blocks", [Base.HunyuanVideo, Base.QwenImage])
        return _by_name(layers, "3072-wide joint attention (transformer_blocks)",
                        [Base.Flux, Base.Chroma, Base.Flux2, Base.QwenImage])
    return None


def _by_name(layers: Layers, what: str, candidates: list[Base]) -> Base:
    words = {Base.Flux2: ("flux[-_.]?2", "klein"), Base.QwenImage: ("qwen",), Base.Chroma: ("chroma",),
             Base.QwenImage21: ("qwen",), Base.Flux: ("flux",), Base.HunyuanVideo: ("hunyuan", "hyvid")}  # fmt: skip
    for base in sorted(candidates, key=lambda b: b is Base.Flux):  # "flux" is in "flux2" too: FLUX.1 last
        if layers.hint(*words[base]):
            return base
    raise _cannot_tell(layers, what, candidates)
