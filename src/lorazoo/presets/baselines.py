"""The LoRA paper's baselines (Hu et al. 2021, Sec. 5.1), for comparing LoRA with in the study; see
lorazoo.baselines; PreEmbed and PreLayer (BERT-family encoders only) in lorazoo.forms.prefix."""
from . import preset as _p

# Adapter targets by architecture: the attention output projection and the FFN output projection of every
# block (BERT/MiniLM, Llama/SmolLM2, GPT-2); Adapter-L only the latter.
_AFTER_ATTN_AND_FFN = r"(.*\.)?(attention\.output\.dense|layer\.\d+\.output\.dense|o_proj|down_proj|c_proj)"
_AFTER_FFN = r"(.*\.)?(layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj)"

PRESETS = [
    _p("full_ft", "FT: full fine-tuning, every parameter trains", "baseline", "parameter selection",
       "LoRA Sec. 5.1", tier="baseline", form="selection", select_params="all"),
    _p("ft_top2", "FT-Top2: only the last two blocks (and the task's head) train", "baseline",
       "parameter selection", "LoRA Sec. 5.1; Li & Liang 2021", tier="baseline", form="selection",
       select_params="top", select_top_blocks=2),
    _p("bitfit", "BitFit: only the bias vectors train", "baseline", "parameter selection",
       "LoRA Sec. 5.1; Zaken et al. 2021", tier="baseline", form="selection", select_params="bias"),
    _p("adapter_h", "Adapter-H: bottleneck adapters after attention and FFN, layer norms trained", "baseline",
       "form (output adapter)", "LoRA Sec. 5.1; Houlsby et al. 2019", tier="baseline", form="adapter_h",
       scale="constant", alpha=1, targets=_AFTER_ATTN_AND_FFN),
    _p("adapter_l", "Adapter-L: one bottleneck adapter with its LayerNorm after the MLP", "baseline",
       "form (output adapter)", "LoRA Sec. 5.1; Lin et al. 2020", tier="baseline", form="adapter_l",
       scale="constant", alpha=1, targets=_AFTER_FFN),
    _p("prefix_embed", "PreEmbed: l_p trainable prefix vectors at the embedding level (BERT-family encoders)",
       "baseline", "prefix (input activations)", "LoRA Sec. 5.1, Table 4/15 (l_p = 256)", tier="baseline",
       form="prefix_embed", prefix_tokens=256),
    _p("prefix_layer", "PreLayer: prefix activations trained at the embeddings and after every block",
       "baseline", "prefix (input activations)", "LoRA Sec. 5.1, Table 4/15 (l_p = 8)", tier="baseline",
       form="prefix_layer", prefix_tokens=8),
]
