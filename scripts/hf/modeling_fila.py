"""FILA in PyTorch for Hugging Face transformers (remote code written by fila-train's export).

The model FILA-train defines (docs/model.md): a CLIP-ViT reads the global view and the tiles of
an image, a ConvNeXt reads the whole image at canvas x 32/14, a CVFM block after each of four ViT
layers adds the matching ConvNeXt stage to the ViT's patch tokens, the projector maps the patch
tokens of the feature layer into the Llama's embeddings, where they replace the `<image>`
placeholder tokens of the prompt.

The towers and the language model are transformers' own classes (`CLIPVisionModel`,
`ConvNextModel`, `LlamaModel` with an `lm_head`); CVFM and the projector are written here the way
FILA-train's `fila-model` computes them. Module names equal the tensor names of FILA-train's
`model.safetensors` (`vision_model.*`, `convnext.*`, `cvfm.{k}.*`, `projector.layers.{i}.*`,
`model.*`, `lm_head.*`), so the file loads as it is.

Inputs (what `FilaProcessor` returns): `input_ids` with one `image_token_id` per visual token,
`pixel_values` `[views, 3, t, t]` (each image's global view, then its tiles row-major),
`hires_pixel_values` `[images, 3, H, W]` (the ConvNeXt input; a list when the images' sizes
differ) and `image_grids` `[images, 3]` (tile rows, tile columns, tiled 0/1).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, GenerationMixin, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fila import FilaConfig

IMAGE_INPUTS = ("pixel_values", "hires_pixel_values", "image_grids")


class FilaCvfm(nn.Module):
    """One CVFM block: h' = h + W_out GELU(W_in [LN(h); LN(c)]) on the patch tokens, CLS unchanged.

    `c` is the ConvNeXt stage map aligned to the ViT cell grid (an r x r convolution of stride r,
    or r x r average pooling), cut into one g x g window per tile, and pooled adaptively to g x g
    for the global view.
    """

    def __init__(self, vit_dim, conv_dim, ratio, alignment):
        super().__init__()
        self.ratio = ratio
        self.align = nn.Conv2d(conv_dim, conv_dim, ratio, stride=ratio) if alignment == "conv" else None
        self.norm_vit = nn.LayerNorm(vit_dim, eps=1e-5)
        self.norm_conv = nn.LayerNorm(conv_dim, eps=1e-5)
        self.fc_in = nn.Linear(vit_dim + conv_dim, vit_dim)
        self.fc_out = nn.Linear(vit_dim, vit_dim)

    def view_features(self, stage_map, rows, cols, tiled, g):
        """`stage_map` `[1, C, rows*g*r, cols*g*r]` -> `[views, g*g, C]`, global view first."""
        expected = (rows * g * self.ratio, cols * g * self.ratio)
        if tuple(stage_map.shape[-2:]) != expected:
            raise ValueError(f"ConvNeXt map {tuple(stage_map.shape[-2:])} does not land on the {rows}x{cols} tile grid (expected {expected})")
        if self.align is not None:
            aligned = self.align(stage_map)
        elif self.ratio == 1:
            aligned = stage_map
        else:
            aligned = F.avg_pool2d(stage_map, self.ratio, self.ratio)
        views = [aligned if (rows, cols) == (1, 1) else F.adaptive_avg_pool2d(aligned, g)]
        if tiled:
            views += [aligned[:, :, i * g : (i + 1) * g, j * g : (j + 1) * g] for i in range(rows) for j in range(cols)]
        return torch.cat(views, 0).flatten(2).transpose(1, 2)

    def forward(self, hidden, conv):
        cls, patches = hidden[:, :1], hidden[:, 1:]
        joined = torch.cat([self.norm_vit(patches), self.norm_conv(conv)], -1)
        return torch.cat([cls, patches + self.fc_out(F.gelu(self.fc_in(joined)))], 1)


class FilaProjector(nn.Module):
    """LLaVA's projector: `depth` linear layers with exact GELU between them."""

    def __init__(self, vision_dim, text_dim, depth):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(vision_dim if i == 0 else text_dim, text_dim) for i in range(depth)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.gelu(x)
        return x


class FilaPreTrainedModel(PreTrainedModel):
    config_class = FilaConfig
    config: FilaConfig
    base_model_prefix = "fila"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "ConvNextStage", "LlamaDecoderLayer"]


class FilaForCausalLM(FilaPreTrainedModel, GenerationMixin):
    def __init__(self, config: FilaConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(CLIPVisionConfig(**config.vision))
        hybrid = config.hybrid
        self.use_convnext = bool(hybrid["use_convnext"])
        self.fusion_layers = list(hybrid["fusion_layers"]) if self.use_convnext else []
        self.feature_layer = config.feature_layer()
        self.grid = config.vision["image_size"] // config.vision["patch_size"]
        vit_dim = config.vision["hidden_size"]
        if self.use_convnext:
            conv = config.convnext
            self.convnext = ConvNextModel(ConvNextConfig(**conv))
            patch = conv["patch_size"]
            strides = [patch, 2 * patch, 4 * patch, 8 * patch]
            self.cvfm = nn.ModuleList([FilaCvfm(vit_dim, conv["hidden_sizes"][k], strides[3] // strides[k], hybrid["alignment"]) for k in range(4)])
        text = config.llama_config()
        self.projector = FilaProjector(vit_dim, text.hidden_size, config.projector_depth())
        self.model = LlamaModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def convnext_stages(self, pixels):
        """The four ConvNeXt stage maps of `pixels` `[N, 3, H, W]`."""
        x = self.convnext.embeddings(pixels)
        maps = []
        for stage in self.convnext.encoder.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def image_features(self, pixel_values, hires_pixel_values=None, image_grids=None):
        """Patch tokens of the feature layer for all images, `[sum views * g*g, D_vit]`."""
        g = self.grid
        if image_grids is None:
            image_grids = torch.tensor([[1, 1, 0]] * pixel_values.shape[0])
        grids = [tuple(int(v) for v in row) for row in image_grids.tolist()]
        views = sum(1 + (rows * cols if tiled else 0) for rows, cols, tiled in grids)
        if views != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} views in pixel_values for image grids {grids} ({views} views)")
        maps = []
        if self.use_convnext:
            if hires_pixel_values is None:
                raise ValueError("this FILA model reads hires_pixel_values (the ConvNeXt input) beside pixel_values")
            if isinstance(hires_pixel_values, torch.Tensor) and hires_pixel_values.dim() == 4 and hires_pixel_values.shape[0] == len(grids) > 1:
                stages = self.convnext_stages(hires_pixel_values.to(self.dtype))
                maps = [[s[i : i + 1] for s in stages] for i in range(len(grids))]
            else:
                hires = list(hires_pixel_values) if not isinstance(hires_pixel_values, torch.Tensor) else list(hires_pixel_values.unbind(0))
                maps = [self.convnext_stages(x.reshape(1, *x.shape[-3:]).to(self.dtype)) for x in hires]
        vit = self.vision_model
        h = vit.pre_layrnorm(vit.embeddings(pixel_values.to(self.dtype)))
        for index, layer in enumerate(vit.encoder.layers[: self.feature_layer]):
            h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
            if index + 1 in self.fusion_layers:
                k = self.fusion_layers.index(index + 1)
                block = self.cvfm[k]
                conv = [block.view_features(m[k], rows, cols, tiled, g) for m, (rows, cols, tiled) in zip(maps, grids)]
                h = block(h, torch.cat(conv, 0))
        return h[:, 1:].reshape(-1, h.shape[-1])

    def encode_images(self, pixel_values, hires_pixel_values=None, image_grids=None):
        """Visual tokens `[sum tokens, D_llm]`: the projector over the feature-layer patch tokens."""
        return self.projector(self.image_features(pixel_values, hires_pixel_values, image_grids))

    def embed(self, input_ids, pixel_values=None, hires_pixel_values=None, image_grids=None):
        """Token embeddings with the visual tokens written over the `<image>` positions."""
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        visual = self.encode_images(pixel_values, hires_pixel_values, image_grids).to(embeds.dtype)
        placeholders = input_ids == self.config.image_token_id
        if int(placeholders.sum()) != visual.shape[0]:
            raise ValueError(f"{int(placeholders.sum())} <image> placeholder tokens in input_ids but {visual.shape[0]} visual tokens from the images")
        return embeds.masked_scatter(placeholders.unsqueeze(-1), visual)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        hires_pixel_values=None,
        image_grids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, hires_pixel_values, image_grids)
        kwargs.pop("return_dict", None)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Position i predicts labels[i + 1]; -100 is not scored.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        fields = CausalLMOutputWithPast.__dataclass_fields__
        cache_field = "cache" if "cache" in fields else "past_key_values"
        cache = getattr(outputs, cache_field, None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **{cache_field: cache})

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """The images enter on the first forward (the prompt) only; later steps read the cache."""
        images = {name: kwargs.pop(name, None) for name in IMAGE_INPUTS}
        first = kwargs.get("is_first_iteration")
        if first is None:
            position = kwargs.get("cache_position")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if position is not None:
                first = int(position[0]) == 0
            elif cache is not None and hasattr(cache, "get_seq_length"):
                first = cache.get_seq_length() == 0
            else:
                first = cache is None
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if first or not kwargs.get("use_cache", True):
            inputs.update({name: value for name, value in images.items() if value is not None})
        else:
            for name in IMAGE_INPUTS:
                inputs.pop(name, None)
        return inputs


__all__ = ["FilaForCausalLM", "FilaPreTrainedModel"]
