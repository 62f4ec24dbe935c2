"""FILA's configuration for Hugging Face transformers (remote code written by fila-train's export).

The nested sections are those of FILA-train's `config.json`, unchanged: `vision` (CLIPVisionConfig
keys), `convnext` (ConvNextConfig keys), `hybrid` (fusion layers, select layer, alignment,
ConvNeXt branch on/off), `projector` (`linear` or `mlp<N>x_gelu`), `llm` (LlamaConfig keys) and
`image_token_id`. FILA-train's loader reads the same file and skips the keys transformers adds.
"""

from transformers import PretrainedConfig

_VISION_DEFAULTS = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_CONVNEXT_DEFAULTS = dict(
    num_channels=3,
    patch_size=4,
    hidden_sizes=[192, 384, 768, 1536],
    depths=[3, 3, 27, 3],
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    layer_scale_init_value=1e-6,
)
_HYBRID_DEFAULTS = dict(fusion_layers=[2, 6, 12, 20], select_layer=-2, alignment="conv", use_convnext=True)
_LLM_DEFAULTS = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
)


def _merged(defaults, given):
    out = dict(defaults)
    out.update(given or {})
    return out


class FilaConfig(PretrainedConfig):
    model_type = "fila"

    def __init__(
        self,
        vision=None,
        convnext=None,
        hybrid=None,
        projector="mlp2x_gelu",
        llm=None,
        image_token_id=128002,
        **kwargs,
    ):
        self.vision = _merged(_VISION_DEFAULTS, vision)
        self.convnext = _merged(_CONVNEXT_DEFAULTS, convnext)
        self.hybrid = _merged(_HYBRID_DEFAULTS, hybrid)
        self.projector = projector
        self.llm = _merged(_LLM_DEFAULTS, llm)
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", bool(self.llm.get("tie_word_embeddings", False)))
        super().__init__(**kwargs)

    def llama_config(self):
        """transformers' LlamaConfig of the language model."""
        from transformers import LlamaConfig

        llm = self.llm
        rope = dict(llm.get("rope_scaling") or {"rope_type": "default"})
        rope["rope_theta"] = float(llm["rope_theta"])
        return LlamaConfig(
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm["num_key_value_heads"],
            head_dim=llm["head_dim"],
            max_position_embeddings=llm["max_position_embeddings"],
            rms_norm_eps=llm["rms_norm_eps"],
            rope_parameters=rope,
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )

    def get_text_config(self, *args, **kwargs):
        return self.llama_config()

    def feature_layer(self):
        """How many ViT layers run: the hidden-state index `hybrid.select_layer` names."""
        layers = self.vision["num_hidden_layers"]
        select = self.hybrid["select_layer"]
        return layers + 1 + select if select < 0 else select

    def projector_depth(self):
        kind = self.projector
        if kind == "linear":
            return 1
        if kind.startswith("mlp") and kind.endswith("x_gelu"):
            return int(kind[3:-6])
        raise ValueError(f"unknown projector {kind!r}; expected `linear` or `mlp<N>x_gelu`")
