"""A tiny Dense Connector LLaVA model directory, built from random weights, fully offline.

* vision: a transformers CLIP (or SigLIP) tower of the real depth (24 layers; SigLIP 27, so
  the presets' layer indices are the real ones) and width 32, 28 px images with 4 px patches
  (49 patches, + CLS for CLIP);
* language model: a 2-layer Llama of width 64 with 2 heads, i.e. head_dim 32 (vLLM's CPU
  attention supports head sizes 32, 64, 80, ...; 16 fails at the first generate);
* tokenizer: a WordLevel vocabulary built here (special tokens, ``<image>``, a few words);
* processor: ``CLIPImageProcessor`` (``SiglipImageProcessor``) + ``LlavaProcessor`` with a
  plain chat template, saved beside the weights;
* the Dense Connector projector (``spec.out_channels(32)`` inputs) set by
  ``dc_kernels.patch_llava``.

Weights are drawn so that the logits are spread and the image matters: the output layer with
std 1 (random Llama weights at the default 0.02 give near-uniform logits, whose top-k order
would hinge on the last bits), the vision tower with std 0.15 (its default init leaves every
layer close to the previous one), the language model with ``initializer_range`` 0.1 (larger
values amplify fp32 rounding of the image embeddings to ~1e-4 in the log-probabilities).

:func:`build` writes either an HF-format checkpoint (the Dense Connector projector inside
``model.safetensors``) or a stock LLaVA checkpoint plus an original ``mm_projector.bin``, and
returns the reference model (transformers + patch_llava) the tests compare vLLM against.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

import dc_kernels
from dc_kernels.integrations.vllm import prepare_model_dir

WORDS = ("a cat dog sat on the mat and ran to house red blue green big small what is in "
         "picture describe this image there are two one three of with under over it").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_SIZE, PATCH = 28, 4
VISION_WIDTH = 32
TEXT_WIDTH, TEXT_HEADS = 64, 2     # head_dim 32
PROMPT = "<s> describe this <image> what is in the picture"
# chat: every message's text after a BOS; vLLM puts "<image>" for each image part (string format)
CHAT_TEMPLATE = "{% for m in messages %}{{ '<s> ' + m['content'] }}{% endfor %}"


def _tokenizer(out_dir: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _image_processor(encoder: str):
    if encoder == "clip":
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    from transformers import SiglipImageProcessor
    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def num_image_tokens(spec, encoder: str = "clip") -> int:
    """Image tokens per image the language model sees for ``spec`` (T counts CLIP's CLS)."""
    return spec.out_tokens((IMAGE_SIZE // PATCH) ** 2 + (encoder == "clip"))


def _llava_config(tokenizer, vision_layers: int, encoder: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig
    common = dict(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH,
                  num_attention_heads=4, num_hidden_layers=vision_layers,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if encoder == "clip":
        vision = CLIPVisionConfig(projection_dim=16, **common)
    else:
        vision = SiglipVisionConfig(**common)
    text = LlamaConfig(hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                       num_hidden_layers=2, num_attention_heads=TEXT_HEADS,
                       num_key_value_heads=TEXT_HEADS, vocab_size=len(tokenizer),
                       max_position_embeddings=256, initializer_range=0.1,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default" if encoder == "clip" else "full",
                       tie_word_embeddings=False)


def build(out_dir: str, spec, *, layout: str = "hf", projector_type: str = "mlp2x_gelu",
          streaming: bool = True, seed: int = 0, encoder: str = "clip",
          vision_layers: Optional[int] = None, section_override: Optional[dict] = None):
    """Write a Dense Connector LLaVA directory to ``out_dir`` and return the reference model.

    Args:
        spec: the ConnectorSpec of the connector.
        encoder: ``"clip"`` (24 layers by default, as ViT-L) or ``"siglip"`` (27 layers by
            default, as so400m; the connector drops the last one, as the original does).
        layout: ``"hf"``: the Dense Connector projector saved inside ``model.safetensors`` (as
            ``save_pretrained`` writes a model patched by ``patch_llava``);
            ``"original"``: a stock LLaVA ``model.safetensors`` (C-wide projector, ignored) and
            the Dense Connector projector in ``mm_projector.bin`` with the original's keys
            (``model.mm_projector.0.weight``, ...), named by the config's ``mm_projector``.
        section_override: keys replaced in (or, with value ``None``, removed from) the
            ``dense_connector`` section after it is written: for the bad-config tests.

    Returns:
        ``(model, processor)``: the transformers LLaVA model patched with
        ``dc_kernels.patch_llava`` (fp32, eval), whose weights are the ones written, and the
        processor.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = _tokenizer(out_dir)
    if vision_layers is None:
        vision_layers = 24 if encoder == "clip" else 27
    # the processor inserts num_image_tokens <image> tokens: for STI more than the patches
    clip = encoder == "clip"
    extra = num_image_tokens(spec, encoder) - (IMAGE_SIZE // PATCH) ** 2 + clip
    processor = LlavaProcessor(image_processor=_image_processor(encoder), tokenizer=tokenizer,
                               patch_size=PATCH,
                               vision_feature_select_strategy="default" if clip else "full",
                               num_additional_image_tokens=extra, image_token="<image>",
                               chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = _llava_config(tokenizer, vision_layers, encoder)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread logits: a large output layer (after the final norm)
        model.lm_head.weight.normal_(0.0, 1.0)
    # spread the vision weights too (the default init leaves the tower near-identity)
    with torch.no_grad():
        for name, p in model.model.vision_tower.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    if layout == "original":
        model.save_pretrained(out_dir)  # the stock projector (C inputs): to be ignored
    dc_kernels.patch_llava(model, spec, projector_type=projector_type)
    with torch.no_grad():  # a projector that matters: spread weights, non-zero biases
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
    if layout == "hf":
        model.save_pretrained(out_dir)
        mm_projector = None
    elif layout == "original":
        mm_projector = "mm_projector.bin"
        state = {f"model.mm_projector.{k}": v.detach().clone()
                 for k, v in model.model.multi_modal_projector.state_dict().items()}
        torch.save(state, os.path.join(out_dir, mm_projector))
    else:
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    prepare_model_dir(out_dir, spec, projector_type, streaming=streaming,
                      mm_projector=mm_projector)
    if section_override:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        for k, v in section_override.items():
            if v is None:
                cfg["dense_connector"].pop(k, None)
            else:
                cfg["dense_connector"][k] = v
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    return model, processor


def image(seed: int):
    """A random 28x28 RGB PIL image (distinct seeds give distinct images)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
