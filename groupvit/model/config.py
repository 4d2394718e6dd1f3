"""`ModelConfig`: every architecture number of GroupViT, named presets, and an analytic FLOPs count.

The `model` section of params.yaml picks a preset and overrides any key:

    model:
      preset: tiny          # tiny | gcc_yfcc; the preset fills every key not given here
      depths: [2, 2, 1]

Fields left at `None` are filled from the preset in `__post_init__`, so `groupvit.config.build(ModelConfig, section)`
(and `load_section`) resolve presets without a special loader; the resolved config (all keys set) rebuilds to itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from groupvit.config import param

# The released model: the official config configs/group_vit_gcc_yfcc_30e.yml of github.com/NVlabs/GroupViT
# (HF `nvidia/groupvit-gcc-yfcc`).
_GCC_YFCC: dict[str, Any] = dict(
    image_size=224, patch_size=16, embed_dim=384, depths=(6, 3, 3), num_heads=(6, 6, 6),
    num_group_tokens=(64, 8, 0), num_output_groups=(64, 8), hard_assignment=True, mlp_ratio=4.0,
    drop_path_rate=0.1, gumbel_tau=1.0, assign_eps=1.0,
    text_width=256, text_layers=12, text_heads=4, context_length=77, vocab_size=49408,
    output_dim=256, proj_hidden_dim=4096, contrast_temperature=0.07, multi_label=True,
)

# Trains on 64 px images on a CPU in minutes: 64 patches + 16 group tokens -> 16 -> 4 segments, 3-layer text tower.
# No stochastic depth: short runs on small data converge faster without it (the reference uses 0.1).
_TINY: dict[str, Any] = dict(
    _GCC_YFCC, image_size=64, patch_size=8, embed_dim=128, depths=(2, 2, 1), num_heads=(4, 4, 4),
    num_group_tokens=(16, 4, 0), num_output_groups=(16, 4), drop_path_rate=0.0,
    text_width=128, text_layers=3, text_heads=2, output_dim=128, proj_hidden_dim=512,
)

PRESETS: dict[str, dict[str, Any]] = {"gcc_yfcc": _GCC_YFCC, "tiny": _TINY}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of GroupViT (image encoder, text encoder, projection heads) and its performance switches.

    `None` means "take the value from `preset`". Performance switches (`attn_impl`, `fused_proj`,
    `trim_text_padding`, `grad_checkpointing`, `mlp_recompute_act`) never change the function the model computes;
    tests prove each matches its plain path.
    """

    preset: str = param("tiny", choices=tuple(PRESETS), help="named preset that fills every key left unset")
    # image encoder
    image_size: int | None = param(None, ge=8, help="training image size (square); eval accepts other sizes")
    patch_size: int | None = param(None, choices=(4, 8, 16), help="patch size (the reference asserts 4, 8 or 16)")
    embed_dim: int | None = param(None, ge=8, help="vision width")
    depths: tuple[int, ...] | None = param(None, ge=1, help="transformer blocks per stage")
    num_heads: tuple[int, ...] | None = param(None, ge=1, help="attention heads per stage")
    num_group_tokens: tuple[int, ...] | None = param(None, ge=0, help="learned group tokens per stage; last is 0")
    num_output_groups: tuple[int, ...] | None = param(None, ge=1, help="segments out of each grouping block")
    hard_assignment: bool | None = param(None, help="Gumbel hard assignment in training, argmax in eval; "
                                                    "false = plain softmax (the paper's soft ablation)")
    mlp_ratio: float | None = param(None, gt=0, help="MLP hidden width / embed_dim in the vision blocks")
    drop_path_rate: float | None = param(None, ge=0, lt=1, help="stochastic depth, linear over all vision blocks")
    gumbel_tau: float | None = param(None, gt=0, help="Gumbel-softmax temperature (reference 1.0)")
    assign_eps: float | None = param(None, ge=0, help="added to the token count when averaging a group (ref. 1)")
    group_residual: float = param(1.0, ge=0, help="scale of the group token added back to its merged image tokens "
                                                  "in each GroupingBlock (reference 1.0; departure, "
                                                  "docs/method.md)")
    # text encoder
    text_width: int | None = param(None, ge=8, help="text transformer width")
    text_layers: int | None = param(None, ge=1, help="text transformer blocks")
    text_heads: int | None = param(None, ge=1, help="reference: width // 64")
    context_length: int | None = param(None, ge=2, help="text tokens incl. SOT and EOT (77 for released weights)")
    vocab_size: int | None = param(None, ge=2, help="BPE vocabulary size (49408 for CLIP's tokenizer)")
    # heads and loss temperatures
    output_dim: int | None = param(None, ge=1, help="joint embedding size")
    proj_hidden_dim: int | None = param(None, ge=1, help="hidden width of the Linear-BN-ReLU-Linear heads")
    contrast_temperature: float | None = param(None, gt=0, help="initial temperature; scale = min(1/T, 100)")
    multi_label: bool | None = param(None, help="own learnable scale for the multi-label loss "
                                                "(false: no multi_label_logit_scale, as the RedCaps release)")
    multi_label_match: str = param("image", choices=("image", "group"),
                                   help="what a prompted noun is matched with in the multi-label loss: image = the "
                                        "pooled image embedding (reference) | group = the image's best-matching "
                                        "final group (departure, docs/method.md)")
    multi_label_patches: float = param(0.0, ge=0,
                                       help="weight of a second multi-label loss in which a noun is matched by the "
                                            "image's best patch token as the first grouping block receives it "
                                            "(0 = off, reference; departure, docs/method.md). No effect "
                                            "without grouping: the plain ViT's patches are its segments")
    # performance switches (same function, different speed/memory)
    attn_impl: str = param("auto", choices=("auto", "sdpa", "eager"),
                           help="fused scaled-dot-product attention, eager, or auto = SDPA except CPU training "
                                "(the CPU flash backward is slower than eager at these lengths)")
    fused_proj: bool = param(True, help="one GEMM for the 4 key/value projections of the image tokens per "
                                        "grouping block (same weights, same names)")
    trim_text_padding: bool = param(True, help="run the causal text tower only up to the last EOT of the batch "
                                               "(exact: later positions never reach the pooled EOT token)")
    grad_checkpointing: bool = param(False, help="recompute each transformer block in backward (saves memory)")
    mlp_recompute_act: bool = param(False, help="keep only the GELU input of each image-tower MLP for backward and "
                                                "recompute its output there, bit for bit (saves memory, ~1 more "
                                                "elementwise op per MLP); not inside checkpointed blocks, and "
                                                "left to the compiler under train.compile")

    def __post_init__(self) -> None:
        preset = PRESETS[self.preset]
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in preset:
                object.__setattr__(self, f.name, preset[f.name])
        self._validate()

    def _validate(self) -> None:
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.num_group_tokens) != n:
            raise ValueError(f"depths, num_heads and num_group_tokens must have one entry per stage; found "
                             f"{len(self.depths)}, {len(self.num_heads)} and {len(self.num_group_tokens)}")
        if len(self.num_output_groups) != n - 1:
            raise ValueError(f"num_output_groups needs one entry per grouping block (len(depths) - 1 = {n - 1}), "
                             f"found {list(self.num_output_groups)}")
        if self.num_group_tokens[-1] != 0:
            raise ValueError("num_group_tokens: the last stage has no grouping block, its entry must be 0")
        if any(g == 0 for g in self.num_group_tokens[:-1]):
            raise ValueError(f"num_group_tokens: every stage but the last needs group tokens, found "
                             f"{list(self.num_group_tokens)}")
        for h in self.num_heads:
            if self.embed_dim % h:
                raise ValueError(f"num_heads: {h} heads do not divide embed_dim {self.embed_dim}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads: {self.text_heads} heads do not divide text_width {self.text_width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) at the training image size."""
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def has_grouping(self) -> bool:
        """False for the plain-ViT "pixel-wise" baseline (one stage, no group tokens)."""
        return self.num_stages > 1


def stage_tokens(cfg: ModelConfig, num_patches: int) -> list[tuple[int, int]]:
    """(image/segment tokens entering stage i, group tokens of stage i) for every stage."""
    out, n = [], num_patches
    for i in range(cfg.num_stages):
        out.append((n, cfg.num_group_tokens[i]))
        if i < cfg.num_stages - 1:
            n = cfg.num_output_groups[i]
    return out


def flops_per_sample(cfg: ModelConfig, k_prompts: int = 0, train: bool = True, text_tokens: int | None = None,
                     image_size: int | None = None) -> float:
    """Analytic matmul/conv FLOPs (2 x multiply-accumulates) per image-text sample.

    Counts patch embedding, all attention/MLP GEMMs, attention score and value products, grouping blocks, group
    projectors, both towers and the projection heads; LayerNorm, softmax, GELU and the loss are ignored (<1%).
    Training counts 3x the forward (backward = 2x). The gcc_yfcc preset gives 9.47 GFLOPs forward caption-only and
    42.2 GFLOPs per training sample with K=3 prompts (the released GroupViT-S).

    Args:
        cfg: the model.
        k_prompts: prompted texts per image in addition to the caption.
        train: forward + backward (x3) instead of forward only.
        text_tokens: text positions actually computed (default: the full context length).
        image_size: image size (default: the training size).
    """
    c, r = cfg.embed_dim, cfg.mlp_ratio
    side = (image_size or cfg.image_size) // cfg.patch_size
    num_patches = side * side
    mac = num_patches * 3 * cfg.patch_size ** 2 * c  # patch embedding

    def block(t: int, w: int, ratio: float) -> float:  # pre-norm transformer block over t tokens
        return t * (4 + 2 * ratio) * w * w + 2 * t * t * w

    for i, (n, g) in enumerate(stage_tokens(cfg, num_patches)):
        if i > 0 and g > 0:  # group projector: MixerMlp over the token axis, hidden c/2
            mac += c * (cfg.num_group_tokens[i - 1] * (c // 2) + (c // 2) * g)
        mac += cfg.depths[i] * block(n + g, c, r)
        if i < cfg.num_stages - 1:  # GroupingBlock: g in-groups, s out-groups, n image tokens
            s = cfg.num_output_groups[i]
            mac += c * (g * int(0.5 * c) + int(0.5 * c) * s)          # mlp_inter over tokens
            mac += 2 * s * c * c + 2 * n * c * c + 2 * s * n * c     # pre-assign q/proj, k/v, scores and values
            mac += s * 4 * c * c * 2                                   # pre-assign MLP (ratio 4 in the reference)
            mac += 2 * s * c * c + 2 * n * c * c + 2 * s * n * c     # assign q/proj, k/v, scores and values
            mac += s * 4 * c * c * 2                                   # channel MLP (ratio 4 in the reference)
    mac += c * cfg.proj_hidden_dim + cfg.proj_hidden_dim * cfg.output_dim  # image head
    w, t = cfg.text_width, text_tokens or cfg.context_length
    text = cfg.text_layers * block(t, w, 4.0) + w * cfg.proj_hidden_dim + cfg.proj_hidden_dim * cfg.output_dim
    mac += (1 + k_prompts) * text
    return 2.0 * mac * (3 if train else 1)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without building the model (used in docs; tested against the module)."""
    c, r = cfg.embed_dim, cfg.mlp_ratio
    ln = 2 * c
    lin = lambda i, o: i * o + o  # noqa: E731
    mlp = lambda d, h, o=None: lin(d, h) + lin(h, o or d)  # noqa: E731
    block = 2 * ln + lin(c, 3 * c) + lin(c, c) + mlp(c, int(r * c))
    n = lin(3 * cfg.patch_size ** 2, c) + ln + cfg.grid[0] * cfg.grid[1] * c + ln  # patch conv + LN, pos, final LN
    for i in range(cfg.num_stages):
        g = cfg.num_group_tokens[i]
        n += cfg.depths[i] * block + g * c
        if i > 0 and g > 0:
            n += ln + mlp(cfg.num_group_tokens[i - 1], c // 2, g)
        if i < cfg.num_stages - 1:
            s = cfg.num_output_groups[i]
            n += 4 * ln + mlp(g, int(0.5 * c), s)  # norm_tokens, norm_post_tokens, norm_x, norm_new_x, mlp_inter
            n += 4 * lin(c, c) + ln + mlp(c, 4 * c) + ln  # pre-assign attn, norm2, mlp, norm_post
            n += 4 * lin(c, c) + mlp(c, int(4 * c))  # assign, channel MLP
    w = cfg.text_width
    n += cfg.vocab_size * w + cfg.context_length * w + 2 * w
    n += cfg.text_layers * (2 * 2 * w + lin(w, 3 * w) + lin(w, w) + mlp(w, 4 * w))
    for d in (c, w):
        n += lin(d, cfg.proj_hidden_dim) + 2 * cfg.proj_hidden_dim + lin(cfg.proj_hidden_dim, cfg.output_dim)
    return n + 1 + int(bool(cfg.multi_label))
